"""mt-translate against a real mt-serve process: order, retries, resume, scoring, and local == server."""

from __future__ import annotations

import email.utils
import gzip
import json
import os
import socket
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import sacrebleu

from service.client import RequestOptions, chunks, retry_after
from service.client import main as mt_translate


@pytest.fixture(scope="session")
def sources(copy_task_dir: Path) -> list[str]:
    """100 held-out copy-task sentences."""
    return (copy_task_dir / "test.src").read_text(encoding="utf-8").splitlines()


@pytest.fixture(scope="session")
def lines(sources: list[str]) -> list[str]:
    """A few hundred lines: the sentences three times in different orders, with empty and blank lines."""
    out = sources + [""] + sources[::-1] + ["", "   "] + sources[1::2] + sources[::2] + [""]
    return out


@pytest.fixture(scope="session")
def reference(server: str, sources: list[str], tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Each sentence's translation from the server, all sent in one request."""
    root = tmp_path_factory.mktemp("reference")
    write(root / "in.txt", sources)
    assert mt_translate(["--server", server, "-i", str(root / "in.txt"), "-o", str(root / "out.txt"), "-q",
                         "--batch-lines", "100"]) == 0  # fmt: skip
    translations = read(root / "out.txt")
    copied = sum(s == t for s, t in zip(sources, translations, strict=True))
    assert copied >= 0.9 * len(sources), "the copy model should copy held-out sentences"
    return dict(zip(sources, translations, strict=True))


def write(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def read(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").split("\n")[:-1]


def expected(lines: list[str], reference: dict[str, str]) -> list[str]:
    return [reference[line] if line.strip() else "" for line in lines]


def test_order_kept_with_concurrent_requests(server: str, lines: list[str], reference: dict[str, str]) -> None:
    """The console command, stdin to stdout, 6 requests in flight of 7 lines each: every line in its place."""
    command = [sys.executable, "-m", "service.client", "--server", server, "--concurrency", "6", "--batch-lines", "7"]
    stdin = "".join(line + "\n" for line in lines)
    result = subprocess.run(command, input=stdin, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:-1] == expected(lines, reference)
    assert "lines/s" in result.stderr  # the progress bar


def test_retries_busy_server_honouring_retry_after(stand_in, lines, reference, tmp_path, capsys) -> None:
    busy = stand_in(lambda n: {0: (503, "1"), 1: (429, None), 2: (503, "1")}.get(n))
    source = write(tmp_path / "in.txt", lines[:20])
    started = time.monotonic()
    code = mt_translate(["--server", busy.url, "-i", str(source), "-o", str(tmp_path / "out.txt"), "-q",
                         "--concurrency", "1", "--batch-lines", "20"])  # fmt: skip
    elapsed = time.monotonic() - started
    assert code == 0
    assert read(tmp_path / "out.txt") == expected(lines[:20], reference)
    assert len(busy.bodies) == 4  # three refusals, then the answer
    assert elapsed >= 2.0, "Retry-After: 1 was not waited for"
    err = capsys.readouterr().err
    assert "HTTP 503" in err and "HTTP 429" in err and "retrying" in err


def test_gives_up_after_retry_budget_naming_server(stand_in, lines, tmp_path, capsys) -> None:
    busy = stand_in(lambda n: (503, "0"))
    source = write(tmp_path / "in.txt", lines[:5])
    code = mt_translate(["--server", busy.url, "-i", str(source), "-o", str(tmp_path / "out.txt"), "-q",
                         "--retries", "2"])  # fmt: skip
    assert code == 1
    assert len(busy.bodies) == 3
    err = capsys.readouterr().err
    assert f"error: {busy.url}: giving up after 3 attempts; last error: HTTP 503: stand-in answers 503" in err


def test_no_server_fails_clearly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as s:  # a port nobody listens on once closed
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    code = mt_translate(["--server", url, "-i", str(write(tmp_path / "in.txt", ["w01"])), "-q", "--retries", "6"])
    assert code == 1
    err = capsys.readouterr().err
    # Reported at the first refused connection, not after six retries with backoff (~30 s).
    assert f"error: cannot connect to {url} (ConnectError: " in err
    assert err.rstrip().endswith(f"is mt-serve running at {url}?")
    assert "retrying" not in err


def test_gzipped_input_and_references(server, sources, reference, tmp_path, capsys) -> None:
    plain = write(tmp_path / "in.txt", sources[:20])
    packed = tmp_path / "in.txt.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    out = tmp_path / "out.txt"
    code = mt_translate(["--server", server, "-i", str(packed), "-o", str(out), "-q", "--ref", str(packed)])
    assert code == 0
    assert read(out) == [reference[line] for line in sources[:20]]
    expected_bleu = sacrebleu.corpus_bleu(read(out), [sources[:20]]).score
    assert f"BLEU = {expected_bleu:.2f}" in capsys.readouterr().err  # the references were read decompressed


def test_refusal_is_not_retried(stand_in, tmp_path, capsys) -> None:
    refusing = stand_in(lambda n: (422, None))
    code = mt_translate(["--server", refusing.url, "-i", str(write(tmp_path / "in.txt", ["w01"])), "-q"])
    assert code == 1
    assert len(refusing.bodies) == 1
    assert "refused the request (HTTP 422: stand-in answers 422)" in capsys.readouterr().err


def test_resume_continues_an_interrupted_run(stand_in, lines, reference, tmp_path) -> None:
    """A run stopped by a server fault mid-way (and a half-written last line) continues where it stopped,
    sending only the lines not yet in the output file."""
    source, out = write(tmp_path / "in.txt", lines), tmp_path / "out.txt"
    flaky = stand_in(lambda n: (500, None) if n >= 3 else None)
    args = ["-i", str(source), "-o", str(out), "-q", "--batch-lines", "10"]
    assert mt_translate(["--server", flaky.url, "--concurrency", "2", *args]) == 1
    partial = read(out)
    assert 0 < len(partial) < len(lines)
    assert partial == expected(lines, reference)[: len(partial)]
    with out.open("a", encoding="utf-8") as f:
        f.write("w03 w0")  # as if killed in the middle of a write

    counting = stand_in(lambda n: None)
    assert mt_translate(["--server", counting.url, "--resume", *args]) == 0
    assert read(out) == expected(lines, reference)
    assert sorted(counting.texts) == sorted(line for line in lines[len(partial) :] if line.strip())


def test_ref_prints_bleu_and_chrf_with_signatures(server, sources, copy_task_dir, tmp_path, capsys) -> None:
    out = tmp_path / "out.txt"
    code = mt_translate(["--server", server, "-i", str(copy_task_dir / "test.src"), "-o", str(out), "-q",
                         "--ref", str(copy_task_dir / "test.tgt")])  # fmt: skip
    assert code == 0
    references = (copy_task_dir / "test.tgt").read_text(encoding="utf-8").splitlines()
    bleu = sacrebleu.corpus_bleu(read(out), [references])
    chrf = sacrebleu.corpus_chrf(read(out), [references])
    err = capsys.readouterr().err
    assert f"BLEU = {bleu.score:.2f}" in err and f"chrF2 = {chrf.score:.2f}" in err
    assert "signature: nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:" in err
    assert "signature: nrefs:1|case:mixed|eff:yes|nc:6|nw:0|space:no|version:" in err


def test_ref_with_other_line_count_is_refused(server, tmp_path, capsys) -> None:
    source, ref = write(tmp_path / "in.txt", ["w01", "w02"]), write(tmp_path / "ref.txt", ["w01"])
    assert mt_translate(["--server", server, "-i", str(source), "--ref", str(ref), "-q"]) == 1
    assert "ref.txt has 1 lines but the input has 2" in capsys.readouterr().err


def test_local_mode_equals_server_mode(server, client_model_dir, lines, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("MT_THREADS", "1")
    source = write(tmp_path / "in.txt", lines)
    for mode, where in (("server", ["--server", server]), ("local", ["--model", str(client_model_dir)])):
        assert mt_translate([*where, "-i", str(source), "-o", str(tmp_path / mode), "-q", "--json"]) == 0
    server_out = [json.loads(line) for line in read(tmp_path / "server")]
    local_out = [json.loads(line) for line in read(tmp_path / "local")]
    assert [r["source"] for r in local_out] == lines
    assert [r["text"] for r in local_out] == [r["text"] for r in server_out]
    assert [r["score"] for r in local_out] == pytest.approx([r["score"] for r in server_out], abs=1e-4)


def test_json_with_attention(server: str, sources: list[str], tmp_path: Path) -> None:
    source = write(tmp_path / "in.txt", [sources[0], "", sources[1]])
    code = mt_translate(["--server", server, "-i", str(source), "-o", str(tmp_path / "out"), "-q", "--json",
                         "--attention"])  # fmt: skip
    assert code == 0
    first, empty, third = (json.loads(line) for line in read(tmp_path / "out"))
    assert empty == {"source": "", "text": "", "score": 0.0}
    for record in (first, third):
        attention = record["attention"]
        assert set(record) == {"source", "text", "score", "attention"}
        assert len(attention["weights"]) == len(attention["target_tokens"])
        assert all(sum(row) == pytest.approx(1.0) for row in attention["weights"])
        assert attention["alignment"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--server", "http://x", "--resume"], "--resume needs -o FILE"),
        (["--server", "http://x", "--attention"], "--attention needs --json"),
        (["--server", "http://x", "--concurrency", "0"], "--concurrency must be at least 1"),
        (["--server", "http://x", "--patience", "0"], "--patience must be a number > 0"),
        (["--server", "http://x", "--model", "m"], "not allowed with argument"),
        (["--server", "127.0.0.1:8000"], "is not an http:// or https:// URL: give one like http://127.0.0.1:8000"),
        (["--server", "localhost:8000"], "is not an http:// or https:// URL: give one like http://localhost:8000"),
        (["--server", "ftp://host"], "is not an http:// or https:// URL: give one like http://127.0.0.1:8000"),
    ],
)
def test_bad_arguments(args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        mt_translate(args)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_local_mode_runs_without_torch(client_model_dir: Path, sources: list[str], reference: dict[str, str]) -> None:
    """The serving path (settings, batcher, engine) with torch and the other train/export-only packages made
    unimportable, as in the Docker images."""
    blocked = ("torch", "onnxscript", "safetensors", "matplotlib")
    code = (
        f"import sys; sys.modules.update(dict.fromkeys({blocked!r}))\n"
        "from service.client import main\n"
        f"sys.exit(main(['--model', {str(client_model_dir)!r}, '-q']))"
    )
    stdin = "".join(line + "\n" for line in sources[:10])
    env = {**os.environ, "MT_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", code], input=stdin, capture_output=True, text=True, env=env, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:-1] == [reference[line] for line in sources[:10]]


def test_resume_refuses_json_written_for_another_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = write(tmp_path / "in.txt", ["w01 w02", "w03"])
    out = write(tmp_path / "out.jsonl", [json.dumps({"source": "w09", "text": "w09"})])
    # Refused before any request: the server address is never contacted.
    code = mt_translate(["--server", "http://127.0.0.1:9", "-i", str(source), "-o", str(out), "--json", "--resume"])
    assert code == 1
    assert f"line 1 of {out} translates 'w09', not 'w01 w02': wrong file?" in capsys.readouterr().err


def test_request_body_carries_only_the_options_given() -> None:
    assert RequestOptions().body(["a"]) == {"text": ["a"], "return_scores": False, "return_attention": False}
    body = RequestOptions(beam_size=5, patience=1.0).body(["a"])
    assert body["beam_size"] == 5 and body["patience"] == 1.0


def test_retry_after_header_forms() -> None:
    assert retry_after("3") == 3.0
    assert retry_after(None) is None and retry_after("soon") is None
    later = email.utils.format_datetime(datetime.now(timezone.utc) + timedelta(seconds=30), usegmt=True)
    assert 25 < retry_after(later) <= 30


def test_chunks_count_only_sent_lines() -> None:
    lines = ["a", "", "b", "c", "", "", "d", ""]
    assert chunks(lines, 0, 2) == [(0, 3), (3, 8)]
    assert chunks(lines, 3, 10) == [(3, 8)]
    assert chunks(lines, 8, 2) == []


def test_api_key_is_sent_as_a_bearer_token(stand_in, lines, tmp_path, capsys, monkeypatch) -> None:
    """From --api-key-file, else from MT_API_KEY; a 401 is not retried and says so."""
    key_file = tmp_path / "key.txt"
    key_file.write_text("s3cret-key\n")
    source = write(tmp_path / "in.txt", lines[:3])
    proxy = stand_in(lambda i: None)
    assert mt_translate(["--server", proxy.url, "-i", str(source), "-q", "--api-key-file", str(key_file)]) == 0
    monkeypatch.setenv("MT_API_KEY", "from-env")
    assert mt_translate(["--server", proxy.url, "-i", str(source), "-q"]) == 0
    monkeypatch.delenv("MT_API_KEY")
    assert mt_translate(["--server", proxy.url, "-i", str(source), "-q"]) == 0
    assert proxy.authorizations == ["Bearer s3cret-key", "Bearer from-env", None]
    capsys.readouterr()
    refusing = stand_in(lambda i: (401, None))
    assert mt_translate(["--server", refusing.url, "-i", str(source), "-q", "--retries", "3"]) == 1
    assert len(refusing.bodies) == 1 and "HTTP 401" in capsys.readouterr().err
