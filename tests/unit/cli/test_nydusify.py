"""``nydusify`` command line: flags of nydus-surface.md §5.2, usage errors, progress output."""

from __future__ import annotations

import io

import pytest

from nydus_vfs.cli import nydusify
from nydus_vfs.cli.nydusify import _ProgressPrinter, build_parser, main


def _help(sub: str) -> str:
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return action.choices[sub].format_help()


def test_convert_flags_keep_upstream_names():
    text = _help("convert")
    for flag in ("--source", "--target", "--target-suffix", "--source-insecure", "--target-insecure", "--plain-http",
                 "--fs-version", "--compressor", "--chunk-size", "--fs-chunk-size", "--prefetch-patterns",
                 "--platform", "--all-platforms", "--merge-platform", "--multi-platform", "--oci", "--work-dir",
                 "--push-chunk-size", "--output-json"):
        assert flag in text, flag
    assert "--target" in _help("check") and "--source" in _help("check")
    assert "--mount-path" in _help("mount")


def test_version_and_usage_errors(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("nydusify ")
    assert main([]) == 1
    assert main(["convert", "--target", "x/y:z"]) == 1
    assert "--source is required" in capsys.readouterr().err
    assert main(["convert", "--source", "BAD REF", "--target", "a/b:c"]) == 1
    assert "invalid image reference" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        build_parser().parse_args(["convert", "--fs-version", "4"])
    with pytest.raises(SystemExit):
        build_parser().parse_args(["convert", "--chunk-size", "abc"])


def test_environment_defaults(monkeypatch):
    monkeypatch.setenv("SOURCE", "reg.io/a:1")
    monkeypatch.setenv("WORK_DIR", "/tmp/wd")
    args = build_parser().parse_args(["convert"])
    assert args.source == "reg.io/a:1" and args.work_dir == "/tmp/wd"
    assert build_parser().parse_args(["convert", "--push-chunk-size", "16MB"]).push_chunk_size == 16 << 20
    assert build_parser().parse_args(["convert", "--chunk-size", "0x200000"]).chunk_size == 0x200000


def test_target_suffix_builds_the_target(monkeypatch):
    seen = {}

    async def fake_convert(opts, progress):
        seen["target"] = opts.target
        raise nydusify.NydusError("stop here")

    monkeypatch.setattr(nydusify, "convert_image", fake_convert)
    assert main(["convert", "--source", "reg.io:5000/ns/app:v1", "--target-suffix=-nydus"]) == 1
    assert seen["target"] == "reg.io:5000/ns/app:v1-nydus"


class _Stream(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self._tty = tty

    def isatty(self) -> bool:
        return self._tty


def test_progress_plain_lines_off_a_terminal_and_a_redrawn_block_on_one():
    plain = _Stream(False)
    p = _ProgressPrinter(plain)
    p("layer 1/2", "pulling")
    p("layer 1/2", "packed")
    assert plain.getvalue() == "layer 1/2: pulling\nlayer 1/2: packed\n"
    tty = _Stream(True)
    p = _ProgressPrinter(tty)
    p("layer 1/2", "pulling")
    p("layer 2/2", "pulling")
    p("layer 1/2", "pushed")
    out = tty.getvalue()
    assert "\x1b[2F" in out and out.rstrip().endswith("layer 2/2: pulling")
    assert "layer 1/2: pushed" in out
