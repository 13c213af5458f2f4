from __future__ import annotations

import json

import pytest

from nydus_vfs.cli import nydus_image
from nydus_vfs.cli.nydus_image import build_parser, main


def _help(sub: str) -> str:
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return action.choices[sub].format_help()


def test_create_help_has_what_the_converter_greps_for_and_nothing_it_cannot_do():
    text = _help("create")
    assert "--type" in text and "tar-rafs" in text and "--source-type" in text
    assert "--blob-inline-meta" in text and "--inline-bootstrap" in text
    # Upstream lists these; the converter passes them only when listed, and they do not work here.
    assert "--batch-size" not in text and "--encrypt" not in text
    for flag in ("--fs-version", "--compressor", "--digester", "--chunk-size", "--bootstrap", "--blob-dir",
                 "--blob-id", "--whiteout-spec", "--prefetch-policy", "--chunk-dict", "--parent-bootstrap",
                 "--aligned-chunk", "--repeatable", "--output-json", "--features"):
        assert flag in text, flag


def test_version(capsys):
    assert main(["--version"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("nydus-image \rVersion: \t0.1.0\nGit Commit: \t")


def test_no_command_is_a_usage_error(capsys):
    assert main([]) == 1


def test_create_check_inspect_in_process(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"data" * 100)
    assert main(["create", "-t", "directory", "-v", "5", "--compressor", "lz4_block", "--digester", "sha256",
                 "--chunk-size", "0x1000", "-B", str(tmp_path / "b"), "-D", str(tmp_path), "-J",
                 str(tmp_path / "o.json"), str(src)]) == 0
    doc = json.loads((tmp_path / "o.json").read_text())
    assert doc["compressor"] == "lz4_block" and doc["fs_version"] == "5"
    assert set(doc) == {"version", "bootstrap", "blobs", "external_bootstrap", "external_blobs", "trace",
                        "fs_version", "compressor"}
    capsys.readouterr()
    assert main(["check", "-B", str(tmp_path / "b"), "-J", str(tmp_path / "c.json")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("RAFS filesystem metadata is valid, referenced data blobs: \n\t 0: ")
    assert json.loads((tmp_path / "c.json").read_text())["blobs"] == doc["blobs"]
    assert "\n" not in (tmp_path / "c.json").read_text()   # check writes compact JSON
    assert main(["inspect", str(tmp_path / "b"), "-R", "stats"]) == 0
    assert json.loads(capsys.readouterr().out)["inodes_count"] == 2


def test_inspect_prompt_mode(tmp_path, capsys, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    assert main(["create", "-B", str(tmp_path / "b"), "-D", str(tmp_path), str(src)]) == 0
    import io
    monkeypatch.setattr(nydus_image.sys, "stdin", io.StringIO("stats\nbogus\nq\n"))
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "b")]) == 0
    out = capsys.readouterr().out
    assert out.count("Inspecting RAFS :> ") == 3 and "Failed to execute command" in out


@pytest.mark.parametrize("argv", [
    ["create", "--chunk-size", "banana", "x"],
    ["create", "--compressor", "gzip", "x"],
    ["create", "--type", "estargz-ref", "x"],
])
def test_argparse_rejections_exit_2(argv):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2


def test_check_argument_conflict(tmp_path):
    assert main(["check", "a", "-B", "b"]) == 1
    assert main(["check"]) == 1
