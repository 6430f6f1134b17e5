"""CLI conventions: exit codes, one-line errors, no partial outputs, stdin, pipes, help."""

import json
import os
import subprocess
import sys
from pathlib import Path




def one_line_error(result, *fragments):
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_version(cli):
    r = cli("--version")
    assert r.exit_code == 0 and r.stdout.startswith("teal 0.")


def test_every_help_has_examples_and_imports_no_torch():
    commands = [[], *[[c] for c in ("tokenize", "detokenize", "cluster", "codecs", "completions")]]
    for cmd in commands:
        out = subprocess.run([sys.executable, "-X", "importtime", "-m", "teal_cli", *cmd, "--help"],
                             capture_output=True, text=True, check=True)
        imported = {line.split("|")[-1].strip() for line in out.stderr.splitlines() if "|" in line}
        assert not {m for m in imported if m == "torch" or m.startswith("torch.")}, cmd
        assert "numpy" not in imported, cmd
        if cmd:
            assert "Examples:" in out.stdout, cmd


def test_corrupt_and_truncated_images(photo, patch_codec, cli, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    r = cli("tokenize", bad, "--codec", patch_codec, "-o", "out.jsonl")
    assert r.exit_code == 1
    one_line_error(r, "bad.png", "cannot read image")
    assert not Path("out.jsonl").exists() and not list(tmp_path.glob(".out.jsonl*"))

    truncated = tmp_path / "cut.jpg"
    truncated.write_bytes(photo.read_bytes()[:5000])
    r = cli("tokenize", truncated, "--codec", patch_codec, "-o", "out.jsonl")
    assert r.exit_code == 1
    one_line_error(r, "cut.jpg")
    assert not Path("out.jsonl").exists()


def test_on_error_skip_reports_and_exits_1(photo, patch_codec, cli, tmp_path):
    (tmp_path / "bad.jpg").write_bytes(b"nope")
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"id": "good", "image": photo.name, "text": "a photo"}) + "\n"
                        + json.dumps({"id": "bad", "image": "bad.jpg"}) + "\n")
    r = cli("tokenize", manifest, "--codec", patch_codec, "--on-error", "skip", "-o", "out.jsonl", "-q")
    assert r.exit_code == 1
    assert "bad.jpg" in r.stderr
    lines = Path("out.jsonl").read_text().splitlines()
    assert [json.loads(l)["id"] for l in lines] == ["good"]
    segs = json.loads(lines[0])["segments"]
    assert [s["modality"] for s in segs] == ["image", "text"] and segs[1]["text"] == "a photo"


def test_empty_audio_is_an_error(cli, tmp_path, wav_file):
    import soundfile as sf

    cli("cluster", wav_file, "--features", "mel", "--k", "8", "--iters", "3", "-q")
    empty = tmp_path / "empty.wav"
    sf.write(empty, [], 16000)
    r = cli("tokenize", empty, "--codec", "mel-80-k8", "-o", "o.jsonl")
    assert r.exit_code == 1
    one_line_error(r, "empty.wav", "empty")
    assert not Path("o.jsonl").exists()


def test_malformed_jsonl_and_out_of_range_ids(patch_codec, cli):
    r = cli("detokenize", "-o", "x.png", input='{"v": 1, "id": "a", "segments": [\n')
    assert r.exit_code == 1
    one_line_error(r, "<stdin>:1", "invalid JSON")
    rec = {"v": 1, "id": "a", "segments": [{"modality": "image", "codec": "patch-p4-k64", "shape": [1, 2], "tokens": [1, 64]}]}
    r = cli("detokenize", "-o", "x.png", input=json.dumps(rec))
    assert r.exit_code == 1
    one_line_error(r, "record 'a' segment 0", "token id 64 is out of range", "vocab_size 64")
    assert not Path("x.png").exists()


def test_unknown_codec_and_usage_errors(photo, cli):
    r = cli("tokenize", photo, "--codec", "nope-k3", "-o", "never.jsonl")
    assert r.exit_code == 1
    one_line_error(r, "unknown codec 'nope-k3'")
    assert not Path("never.jsonl").exists()
    r = cli("tokenize", photo)
    assert r.exit_code == 2
    one_line_error(r, "--codec is required")
    r = cli("tokenize", photo, "--codec", "x", "--on-error", "maybe")
    assert r.exit_code == 2
    r = cli("tokenize", photo, "--codec", "x", "--device", "tpu")
    assert r.exit_code == 2
    one_line_error(r, "--device tpu")
    r = cli("tokenize", photo, "--batch-size", "0", "--codec", "x")
    assert r.exit_code == 2


def test_missing_file_and_debug_traceback(patch_codec, cli, monkeypatch):
    r = cli("tokenize", "missing.png", "--codec", patch_codec)
    assert r.exit_code == 1
    one_line_error(r, "missing.png: no such file")
    monkeypatch.setenv("TEAL_DEBUG", "1")
    r = cli("tokenize", "missing.png", "--codec", patch_codec)
    assert "Traceback" in r.stderr and r.exit_code == 1


def test_terminal_stdin_is_a_usage_error_not_a_hang(patch_codec):
    # A pseudo-terminal on stdin and no inputs: must exit 2 at once.
    import pty

    leader, follower = pty.openpty()
    try:
        out = subprocess.run([sys.executable, "-m", "teal_cli", "tokenize", "--codec", str(patch_codec)],
                             stdin=follower, capture_output=True, text=True, timeout=60)
    finally:
        os.close(leader)
        os.close(follower)
    assert out.returncode == 2
    assert "no input given" in out.stderr


def test_real_shell_pipe(photo, patch_codec, tmp_path):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    cmd = f"teal tokenize {photo.name} --codec {patch_codec} | teal detokenize -o piped.png"
    out = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    from PIL import Image

    assert Image.open("piped.png").size == (640, 427)
    # And a failing upstream leaves no output file downstream.
    out = subprocess.run(["bash", "-o", "pipefail", "-c", f"teal tokenize nothing.png --codec {patch_codec} | teal detokenize -o never.png"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 1 and not Path("never.png").exists()


def test_detokenize_outputs_folder_pattern_and_single_file(photo, patch_codec, cli, tmp_path):
    (tmp_path / "pics").mkdir()
    second = tmp_path / "pics" / "two.jpg"
    second.write_bytes(photo.read_bytes())
    tok = cli("tokenize", "photo.jpg", "pics", "--codec", patch_codec, "--image-size", "32", "-q")
    assert tok.exit_code == 0, tok.stderr
    assert len(tok.stdout.splitlines()) == 2
    assert cli("detokenize", "-o", "out/", "-q", input=tok.stdout).exit_code == 0
    assert sorted(p.name for p in Path("out").iterdir()) == ["photo.png", "pics_two.png"]
    assert cli("detokenize", "-o", "pat/{id}.png", "-q", input=tok.stdout).exit_code == 0
    assert len(list(Path("pat").iterdir())) == 2
    r = cli("detokenize", "-o", "single.png", input=tok.stdout)
    assert r.exit_code == 2
    one_line_error(r, "names one file")
    assert not Path("single.png").exists()


def test_decompression_bomb_refused(cli, patch_codec, tmp_path, monkeypatch):
    from PIL import Image

    Image.new("L", (400, 400)).save(tmp_path / "big.png")
    monkeypatch.setenv("TEAL_MAX_IMAGE_PIXELS", "1000")
    pil_limit = Image.MAX_IMAGE_PIXELS
    r = cli("tokenize", tmp_path / "big.png", "--codec", patch_codec, "--loader", "threads")
    assert r.exit_code == 1
    one_line_error(r, "big.png", "decompression bomb")
    # teal's limit is its own: Pillow's process-wide guard is not lowered for other code.
    assert Image.MAX_IMAGE_PIXELS == pil_limit


def test_codecs_lists_local_directories(patch_codec, cli):
    r = cli("codecs", "--json")
    assert r.exit_code == 0
    names = [json.loads(l)["name"] for l in r.stdout.splitlines()]
    assert "patch-p4-k64" in names


def test_shards_partition_the_input(photo, patch_codec, cli, tmp_path):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps({"id": f"r{i}", "image": photo.name}) + "\n" for i in range(5)))
    ids = []
    for i in range(2):
        r = cli("tokenize", manifest, "-c", patch_codec, "--image-size", "8", "--shard", f"{i}/2", "-o", "t.{shard}.jsonl", "-q")
        assert r.exit_code == 0, r.stderr
        ids += [json.loads(l)["id"] for l in Path(f"t.{i}.jsonl").read_text().splitlines()]
    assert sorted(ids) == [f"r{i}" for i in range(5)]
    r = cli("tokenize", manifest, "-c", patch_codec, "--shard", "2/2")
    assert r.exit_code == 2
    one_line_error(r, "--shard 2/2")


def test_tokenize_output_folder_and_pattern(photo, patch_codec, cli, tmp_path):
    (tmp_path / "pics").mkdir()
    (tmp_path / "pics" / "a.jpg").write_bytes(photo.read_bytes())
    (tmp_path / "pics" / "b.jpg").write_bytes(photo.read_bytes())
    r = cli("tokenize", "pics", "-c", patch_codec, "--image-size", "8", "-o", "toks/", "-q")
    assert r.exit_code == 0, r.stderr
    assert sorted(p.name for p in Path("toks").iterdir()) == ["pics_a.jsonl", "pics_b.jsonl"]
    r = cli("tokenize", "pics", "-c", patch_codec, "--image-size", "8", "-o", "one/{id}.tok.jsonl", "-q")
    assert r.exit_code == 0, r.stderr
    (line,) = Path("one/pics_a.tok.jsonl").read_text().splitlines()
    assert json.loads(line)["id"] == "pics/a.jpg"
