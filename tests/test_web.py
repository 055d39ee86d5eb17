"""`python export.py --format web`: the static site's folder, and its bad input. The page itself, in a browser,
is tested in test_web_browser.py."""

import os

import pytest

import export
from conftest import call_main, one_line_error


def needs_onnxruntime_web():
    """Skip without node_modules/onnxruntime-web outside CI; in CI it is an error (.ci/run runs `npm ci`)."""
    missing = [str(source) for source in export.SITE.values() if not source.is_file()]
    if missing and os.environ.get("CI"):
        raise RuntimeError(f"CI must test the web export, but {missing[0]} is missing: .ci/run runs `npm ci`")
    if missing:
        pytest.skip(f"onnxruntime-web is not installed ({missing[0]} is missing): run `npm ci`")


@pytest.fixture
def run_export(capsys):
    """export.py's main, run in this process."""
    return lambda *args: call_main(capsys, export.main, args)


def checkpoint_in(trained_run, folder):
    """A copy of the synthetic run's best.pt in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "best.pt").write_bytes((trained_run / "best.pt").read_bytes())
    return folder / "best.pt"


def test_missing_checkpoint_is_one_line(run_export, tmp_path):
    """A checkpoint path with no file gets one error line naming it, and no folder is made."""
    line = one_line_error(run_export(tmp_path / "nothere.pt", "--format", "web"))
    assert "nothere.pt" in line
    assert list(tmp_path.iterdir()) == []


def test_missing_onnxruntime_web_names_the_command(run_export, trained_run, tmp_path, monkeypatch):
    """Without node_modules/onnxruntime-web, one line says to run `npm ci`, before any export work."""
    monkeypatch.setitem(export.SITE, "ort.wasm.min.js", tmp_path / "node_modules" / "ort.wasm.min.js")
    line = one_line_error(run_export(checkpoint_in(trained_run, tmp_path / "run"), "--format", "web"))
    assert "onnxruntime-web" in line and "npm ci" in line
    assert not (tmp_path / "run" / "web").exists()


@pytest.mark.parametrize("where", ["file", "under a file", "another folder", "the checkpoint's folder"])
def test_an_output_folder_that_cannot_be_written_is_one_line(run_export, trained_run, tmp_path, where):
    """--out that is a file, lies under one, holds other files or holds the checkpoint: one line, nothing touched."""
    checkpoint = checkpoint_in(trained_run, tmp_path / "run")
    (tmp_path / "notes.txt").write_text("keep me")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("keep me")
    out = {
        "file": tmp_path / "notes.txt",
        "under a file": tmp_path / "notes.txt" / "web",
        "another folder": tmp_path / "mine",
        "the checkpoint's folder": tmp_path / "run",
    }[where]
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    line = one_line_error(run_export(checkpoint, "--format", "web", "--out", out))
    assert str(out) in line
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def fake_site(folder, model=b"old model"):
    """A folder that looks like an earlier export: every file of the site, with placeholder contents."""
    folder.mkdir()
    for name in export.SITE:
        (folder / name).write_text(f"old {name}")
    (folder / export.MODEL_FILE).write_bytes(model)


def test_write_site_holds_exactly_the_pages_files(tmp_path):
    """The site is the page's files, onnxruntime-web's WebAssembly backend and model.onnx: nothing else."""
    needs_onnxruntime_web()
    export.write_site(tmp_path / "web", b"model")
    names = {p.name for p in (tmp_path / "web").iterdir()}
    assert names == {*export.SITE, export.MODEL_FILE}
    assert not any(name.endswith((".jsep.wasm", ".jsep.mjs", ".map")) or "webgpu" in name for name in names)
    assert (tmp_path / "web" / "index.html").read_bytes() == (export.STATIC / "index.html").read_bytes()
    assert [p.name for p in tmp_path.iterdir()] == ["web"]  # no temporary folder left


def test_a_failed_write_leaves_the_earlier_site_whole(tmp_path, monkeypatch):
    """A copy that fails half-way leaves the earlier site as it was, one error, and no temporary folder."""
    fake_site(tmp_path / "web")
    before = {p.name: p.read_bytes() for p in (tmp_path / "web").iterdir()}
    monkeypatch.setitem(export.SITE, "prepare.js", tmp_path / "gone" / "prepare.js")
    with pytest.raises(export.UserError, match="nothing there has changed"):
        export.write_site(tmp_path / "web", b"new model")
    assert {p.name: p.read_bytes() for p in (tmp_path / "web").iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["web"]


def test_a_new_export_replaces_an_earlier_site(tmp_path):
    """Writing over an earlier site replaces all of it, and leaves no old copy beside it."""
    needs_onnxruntime_web()
    fake_site(tmp_path / "web")
    (tmp_path / "web" / "stale.js").write_text("from an older version")
    export.write_site(tmp_path / "web", b"new model")
    assert (tmp_path / "web" / export.MODEL_FILE).read_bytes() == b"new model"
    assert not (tmp_path / "web" / "stale.js").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["web"]
