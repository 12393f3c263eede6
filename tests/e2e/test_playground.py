"""The playground page in a real browser: Playwright drives Debian's Chromium through `genlab serve` on tiny runs:
the API key, chat with streaming, an image grid, inpainting a painted mask, two arena battles with votes and the
leaderboard, the CSV export, keyboard tabs and a phone-sized layout. Screenshots are kept under the test's tmp dir
(and copied to $GENLAB_SCREENSHOTS when set: `GENLAB_SCREENSHOTS=docs` refreshes docs/playground.png)."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import write_config

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium (make installs it: apt-get install "
                                                     "chromium)"),
]
sync_api = pytest.importorskip("playwright.sync_api", reason="needs PyPI playwright (pip install -e '.[serve]')")

# A plain chat template: a tiny GPT trained for a few steps stands in for an assistant in the chat tab.
TEMPLATE = ("{% for m in messages %}{{ m['role'] | upper }}:\n{{ m['content'] }}\n\n{% endfor %}"
            "{% if add_generation_prompt %}ASSISTANT:\n{% endif %}")


@pytest.fixture(scope="module")
def runs(trained_gpt, trained_ngram, tmp_path_factory):
    """Four runs: a tiny chat model (a BPE GPT with a chat template), the session's tiny GPT and n-gram
    (completion models for the arena), and a class-conditional diffusion model on 8x8 digits (images, inpainting)."""
    from genlab import api

    d = tmp_path_factory.mktemp("playground_runs")
    small = {"max_steps": 4, "batch_size": 8, "eval_every": 4, "eval_batches": 1, "checkpoint_every": 4}
    cfg = write_config(d / "chat.toml", name="tiny-chat", data={"tokenizer": "bpe", "max_chars": 20000},
                       model={"block_size": 256}, out_dir=d, train=small)
    chat, _ = api.train(cfg)
    (chat / "hf_tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATE}))
    cfg = write_config(d / "digits.toml", name="digits", family="diffusion", data={"source": "digits"},
                       model={"conditional": True}, out_dir=d, train={**small, "batch_size": 16})
    digits, _ = api.train(cfg)
    return [chat, trained_gpt, trained_ngram, digits]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(runs, tmp_path_factory):
    """`genlab serve` on the four runs with API keys on; yields (base URL, key, its log); stopped at the end."""
    from genlab.serve.auth import KeyStore

    state = tmp_path_factory.mktemp("serve_state")
    keys = KeyStore(state / "keys.sqlite")  # as `genlab keys create browser --state STATE` does
    key = keys.create("browser")[1]
    keys.close()
    port = _free_port()
    log = open(state / "server.log", "w")  # noqa: SIM115 - closed below
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "genlab", "serve", *map(str, runs), "--host", "127.0.0.1",
                             "--port", str(port), "--state", str(state)], stdout=log, stderr=subprocess.STDOUT,
                            env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"genlab serve exited ({proc.returncode}):\n{(state / 'server.log').read_text()}")
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2) as r:
                    if json.loads(r.read())["status"] == "ok":
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"genlab serve did not answer /health:\n{(state / 'server.log').read_text()}")
            time.sleep(0.25)
        yield base, key, state / "server.log"
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        try:
            yield b
        finally:
            b.close()


def _png(b64: str) -> np.ndarray:
    with Image.open(io.BytesIO(base64.b64decode(b64))) as im:
        return np.asarray(im.convert("L"))


def test_playground_in_a_real_browser(server, browser, tmp_path):
    base, key, server_log = server
    expect = sync_api.expect
    expect.set_options(timeout=30_000)
    shots = tmp_path / "screenshots"
    shots.mkdir()
    page = browser.new_page(viewport={"width": 1280, "height": 860}, accept_downloads=True)
    page.set_default_timeout(30_000)
    console_errors = []
    page.on("pageerror", lambda e: console_errors.append(str(e)))
    page.goto(base + "/")

    # ---- the API key: without it the model list is refused (401), with it the models appear
    status = page.get_by_test_id("server-status")
    expect(status).to_contain_text("401")
    expect(status).to_contain_text("API key")
    page.fill("#api-key", key)
    page.click("#key-save")
    expect(status).to_contain_text("models served")
    assert page.evaluate("localStorage.getItem('genlab.apiKey')") == key
    assert page.locator("#chat-model option").all_inner_texts() == ["tiny-chat"]
    assert set(page.locator("#comp-model option").all_inner_texts()) == {"tiny-chat", "gpt", "ngram"}

    # ---- keyboard: the tabs move with the arrow keys, and back
    page.focus("#tab-chat")
    page.keyboard.press("ArrowRight")
    expect(page.locator("#tab-completion")).to_have_attribute("aria-selected", "true")
    expect(page.locator("#panel-completion")).to_be_visible()
    page.keyboard.press("ArrowLeft")
    expect(page.locator("#panel-chat")).to_be_visible()

    # ---- chat: the reply streams in (several updates of the live region) under a system prompt
    page.evaluate("""() => {
        window.replyLengths = [];
        new MutationObserver(() => {
            const r = document.querySelector('[data-testid="chat-reply"] .text');
            if (r) window.replyLengths.push(r.textContent.length);
        }).observe(document.getElementById('chat-log'), {subtree: true, childList: true, characterData: true});
    }""")
    page.fill("#chat-system", "You speak like a king.")
    page.fill("#chat-max_tokens", "80")
    page.fill("#chat-seed", "0")
    page.fill("#chat-input", "Speak, good sir")
    page.press("#chat-input", "Enter")
    expect(page.locator("#chat-send")).to_be_enabled()
    expect(page.get_by_test_id("chat-error")).to_be_empty()
    reply = page.locator('[data-testid="chat-reply"] .text')
    expect(reply).to_have_count(1)
    text = reply.inner_text()
    assert len(text) > 20, text
    lengths = sorted(set(page.evaluate("window.replyLengths")) - {0})
    assert len(lengths) >= 2, lengths  # streamed: the text grew in steps
    expect(page.locator("#chat-stats")).to_contain_text("first token after")
    page.screenshot(path=shots / "chat.png")

    # ---- completion: two streamed samples at once, cut at a stop sequence
    page.click("#tab-completion")
    page.select_option("#comp-model", "gpt")
    page.fill("#comp-prompt", "ROMEO:")
    page.fill("#comp-n", "2")
    page.fill("#comp-max_tokens", "24")
    page.fill("#comp-top_k", "20")
    page.fill("#comp-seed", "3")
    page.fill("#comp-stop", "zz")
    page.click("#comp-run")
    expect(page.locator("#comp-run")).to_have_text("Complete")
    expect(page.get_by_test_id("comp-error")).to_be_empty()
    for i in range(2):
        assert page.get_by_test_id(f"comp-choice-{i}").inner_text().startswith("ROMEO:")
    samples = [page.get_by_test_id(f"comp-choice-{i}").inner_text() for i in range(2)]
    assert samples[0] != samples[1] and all(len(t) > len("ROMEO:") for t in samples), samples

    # ---- images: a grid of 8 class-3 digits from the diffusion run
    page.click("#tab-images")
    page.select_option("#img-model", "digits")
    expect(page.locator("#img-sampler option")).not_to_have_count(0)
    page.select_option("#img-class", "3")
    page.fill("#img-steps", "8")
    page.fill("#img-n", "8")
    page.fill("#img-seed", "1")
    page.click("#img-run")
    grid = page.locator('#img-grid img[data-testid="grid-image"]')
    expect(grid).to_have_count(8)
    expect(page.get_by_test_id("img-error")).to_be_empty()
    first = grid.first.get_attribute("src").split(",", 1)[1]
    assert _png(first).shape == (8, 8)
    page.screenshot(path=shots / "images.png")

    # ---- inpaint: take the first image, paint the bottom half with the mouse, repaint it
    page.get_by_test_id("to-inpaint").first.click()
    expect(page.locator("#panel-inpaint")).to_be_visible()
    expect(page.get_by_test_id("inp-mask-info")).to_contain_text("0 of 64 pixels")
    box = page.locator("#inp-canvas").bounding_box()
    page.mouse.move(box["x"] + 4, box["y"] + box["height"] * 0.8)
    page.mouse.down()
    for k in range(1, 11):
        page.mouse.move(box["x"] + box["width"] * k / 10, box["y"] + box["height"] * (0.8 if k % 2 else 0.9),
                        steps=3)
    page.mouse.up()
    info = page.get_by_test_id("inp-mask-info")
    expect(info).not_to_contain_text("No image")
    painted = int(info.inner_text().split()[0])
    assert 0 < painted < 64, info.inner_text()
    bits = np.array(page.evaluate("Array.from(inpaintMaskBits())"), dtype=bool).reshape(8, 8)
    assert bits[6:].any() and not bits[:4].any()  # the strokes were low on the canvas
    page.fill("#inp-steps", "8")
    page.fill("#inp-n", "3")
    page.fill("#inp-seed", "0")
    page.click("#inp-run")
    out = page.locator('#inp-grid img[data-testid="grid-image"]')
    expect(out).to_have_count(3)
    expect(page.get_by_test_id("inp-error")).to_be_empty()
    source = _png(first)
    for img in out.all():
        res = _png(img.get_attribute("src").split(",", 1)[1])
        assert (res[~bits] == source[~bits]).all()  # the unpainted pixels kept exactly: transparent = repaint
    page.screenshot(path=shots / "inpaint.png")

    # ---- arena: two battles, each vote reveals the names and changes the leaderboard
    page.click("#tab-arena")
    expect(page.get_by_test_id("arena-votes")).to_contain_text("0 votes")
    tables = []
    for prompt, vote in (("ROMEO:", "#vote-a"), ("To be, or not", "#vote-tie")):
        page.fill("#arena-prompt", prompt)
        page.click("#arena-run")
        expect(page.locator("#arena-run")).to_be_enabled()  # the battle is over
        assert not page.get_by_test_id("arena-error").inner_text(), server_log.read_text()[-3000:]
        expect(page.locator(vote)).to_be_enabled()
        assert page.get_by_test_id("arena-name-a").inner_text() == "Model A"  # anonymous until the vote
        assert page.get_by_test_id("arena-a").inner_text() or page.get_by_test_id("arena-b").inner_text()
        page.click(vote)
        expect(page.get_by_test_id("arena-name-a")).to_contain_text("Model A: ")
        names = [page.get_by_test_id(f"arena-name-{s}").inner_text().split(": ")[1] for s in "ab"]
        assert len(set(names)) == 2 and set(names) <= {"tiny-chat", "gpt", "ngram"}
        expect(page.get_by_test_id("arena-vote-result")).not_to_be_empty()
        n = len(tables) + 1
        expect(page.get_by_test_id("arena-votes")).to_contain_text(f"{n} vote{'s' if n > 1 else ''} so far")
        tables.append(page.locator('[data-testid="lb-row"]').all_inner_texts())
    assert len(tables[0]) == 2 and 2 <= len(tables[1]) <= 3 and tables[0] != tables[1]
    assert all("–" not in row.split("\t")[2] for row in tables[1])  # every model that battled has a score
    # a second vote on the same battle is refused by the server, and the buttons stay off
    expect(page.locator("#vote-a")).to_be_disabled()
    with page.expect_download() as dl:
        page.click("#arena-csv")
    csv_text = Path(dl.value.path()).read_text()
    assert csv_text.splitlines()[0] == "rank,model,score,ci_low,ci_high,battles,wins,losses,ties"
    assert len(csv_text.splitlines()) == len(tables[1]) + 1
    page.screenshot(path=shots / "arena.png", full_page=True)
    playground = shots / "arena.png"

    # ---- RAG answers: each [n] of the answer is a button that opens its passage. This checks the page's side of
    # the contract (the "citations" of the last stream chunk); no rag: model is served here, as one needs an
    # embedding index and a generator that writes [n], which a few-step tiny model does not.
    page.click("#tab-rag")
    expect(page.get_by_test_id("rag-error")).to_be_empty()
    page.evaluate("""() => {
        const cites = [1, 2].map((n) => ({n, source: `guide${n}.md`, location: `section ${n}`, start: 10 * n,
                                          end: 10 * n + 9, text: `passage number ${n}`, by: n === 2 ? "model" : null}));
        renderAnswer(document.getElementById('rag-answer'), 'It lasts 42 minutes [2]. See [7].', new Set([1, 2]));
        renderSources(cites);
    }""")
    cites = page.get_by_test_id("rag-cite")
    expect(cites).to_have_count(1)  # [7] names no source: it stays text
    expect(page.locator("#rag-source-2 blockquote")).not_to_be_visible()
    cites.first.click()
    expect(page.locator("#rag-source-2 blockquote")).to_have_text("passage number 2")
    expect(page.locator("#rag-source-2 summary")).to_be_focused()
    expect(page.locator("#rag-source-2 summary")).to_contain_text("guide2.md (section 2, characters 20-29)")

    # ---- an error is shown readably: a revoked-looking key is refused with the server's message
    page.fill("#api-key", "sk-wrong")
    page.click("#key-save")
    expect(status).to_contain_text("Incorrect or revoked API key")
    page.fill("#api-key", key)
    page.click("#key-save")
    expect(status).to_contain_text("models served")

    # ---- a phone: one column, nothing wider than the screen
    phone = browser.new_page(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    phone.add_init_script(f"localStorage.setItem('genlab.apiKey', {json.dumps(key)})")
    phone.goto(base + "/#arena")
    expect(phone.get_by_test_id("server-status")).to_contain_text("models served")
    expect(phone.locator('[data-testid="lb-row"]')).to_have_count(len(tables[1]))
    assert phone.evaluate("document.documentElement.scrollWidth <= window.innerWidth + 1")
    phone.screenshot(path=shots / "phone.png", full_page=True)
    assert not console_errors, console_errors

    if os.environ.get("GENLAB_SCREENSHOTS"):  # the README's picture
        dest = Path(os.environ["GENLAB_SCREENSHOTS"])
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copy(playground, dest / "playground.png")
