"""The `mmsearch` CLI: tools from the shell, exit codes, and no tracebacks for bad input."""

import json
import subprocess
import sys

import pytest

from mmsearch.cli.main import main


def test_help_does_not_import_the_heavy_stack():
    code = "import sys, mmsearch.cli.main as m; m.build_parser(); print(sorted({'torch', 'transformers', 'faiss'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_search_text_json(index_dir, capsys):
    assert main(["search", "text", "capital city", "--index", str(index_dir), "--k", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["tool"] == "text_search" and result["arguments"] == {"query": "capital city", "k": 2}
    assert not result["is_error"] and result["text"].startswith("[1] ") and "[2] " in result["text"]


def test_search_text_error_result_exits_1(index_dir, capsys):
    assert main(["search", "text", "   ", "--index", str(index_dir), "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["text"] == "Error: text_search: query is empty; write what you are looking for"


def test_search_image_with_a_crop(index_dir, world_dir, capsys):
    scene = json.loads((world_dir / "scenes.jsonl").read_text().splitlines()[0])
    assert main(["search", "image", str(world_dir / scene["path"]), "--bbox", "0,0,200,150",
                 "--index", str(index_dir)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Cropped image 0 at [0, 0, 200, 150] -> [image 1]") and "\n[1] " in out


@pytest.mark.parametrize(
    "bbox,code,message",
    [("0,0,9999,10", 1, "exceeds image width"), ("1,2", 1, "is too short"), ("a,b,c,d", 2, "four numbers")],
)
def test_search_image_bad_bbox(index_dir, world_dir, capsys, bbox, code, message):
    scene = json.loads((world_dir / "scenes.jsonl").read_text().splitlines()[0])
    assert main(["search", "image", str(world_dir / scene["path"]), "--bbox", bbox, "--index", str(index_dir)]) == code
    captured = capsys.readouterr()
    assert message in captured.out + captured.err


def test_corrupt_image_is_a_clear_error(index_dir, tmp_path, capsys):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    assert main(["search", "image", str(bad), "--index", str(index_dir)]) == 2
    assert "cannot read image" in capsys.readouterr().err


def test_bad_index_and_config_errors_exit_2_without_traceback(tmp_path, capsys):
    assert main(["search", "text", "x", "--index", str(tmp_path / "missing")]) == 2
    assert "index dir not found" in capsys.readouterr().err
    assert main(["world", "build", "--out", str(tmp_path / "w"), "colour=red"]) == 2
    assert "colour" in capsys.readouterr().err


def test_world_build_from_the_cli(tmp_path, capsys):
    assert main(["world", "build", "--out", str(tmp_path / "w"), "--entities", "30", "--seed", "3"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["entities"] == 30 and (tmp_path / "w" / "passages.jsonl").is_file()
