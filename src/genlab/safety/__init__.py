"""Safety and provenance: guardrails (checks as data, one pipeline for generate, chat, RAG and the server), text and
image watermarks with their detectors, and provenance metadata in every PNG genlab writes."""
