"""`python export.py --format web`: the static site's folder, and its bad input. The page itself, in a browser,
is tested in test_web_browser.py."""

import json
import os
import re
import signal
import time

import pytest

import export
from conftest import call_main, missing_tool, one_line_error


def needs_onnxruntime_web():
    """Skip without node_modules/onnxruntime-web outside CI, naming the command; in CI it is an error."""
    missing = [str(source) for source in export.SITE.values() if not source.is_file()]
    if missing:
        missing_tool(f"onnxruntime-web is not installed ({missing[0]} is missing)", f"run `npm ci` in {export.ROOT}")


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


@pytest.mark.parametrize(
    "where",
    [
        "file",
        "under a file",
        "the checkpoint's folder",
        "a link to it",
        "a link to nothing",
        "a folder above the checkpoint",
        "a folder of runs",
        "another run's folder",
    ],
)
def test_an_output_folder_that_cannot_be_written_is_one_line(run_export, trained_run, tmp_path, where):
    """--out that is a file, lies under one, is a link to nothing, holds the checkpoint (through a link too; a
    checkpoint of any name, at any depth) or holds a run folder (a folder with a best.pt, last.pt or metrics.json):
    one line naming it, and nothing touched."""
    checkpoint = checkpoint_in(trained_run, tmp_path / "models" / "mnist")
    checkpoint = checkpoint.rename(checkpoint.with_name("cnn.pt"))  # not a run's file name: only the first guard
    (tmp_path / "notes.txt").write_text("keep me")
    run = checkpoint_in(trained_run, tmp_path / "runs" / "exp1").parent
    (tmp_path / "link").symlink_to(checkpoint.parent)
    (tmp_path / "dangling").symlink_to(tmp_path / "gone")
    out = {
        "file": tmp_path / "notes.txt",
        "under a file": tmp_path / "notes.txt" / "web",
        "the checkpoint's folder": checkpoint.parent,
        "a link to it": tmp_path / "link",
        "a link to nothing": tmp_path / "dangling",
        "a folder above the checkpoint": tmp_path / "models",
        "a folder of runs": run.parent,
        "another run's folder": run,
    }[where]
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    line = one_line_error(run_export(checkpoint, "--format", "web", "--out", out))
    assert str(out) in line
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


@pytest.mark.parametrize("name", ["index.html", "model.onnx", "worker.js"])
def test_a_users_file_with_a_site_files_name_is_refused_in_one_line(run_export, trained_run, tmp_path, name):
    """A file of the user's in --out with the name of a site file is named in one line and left as it was, and
    nothing is written beside it."""
    checkpoint = checkpoint_in(trained_run, tmp_path / "run")
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / name).write_text("mine")
    line = one_line_error(run_export(checkpoint, "--format", "web", "--out", tmp_path / "site"))
    assert str(tmp_path / "site" / name) in line
    assert [p.name for p in (tmp_path / "site").iterdir()] == [name]
    assert (tmp_path / "site" / name).read_text() == "mine"


def test_the_site_holds_the_pages_files_and_a_manifest_of_them(run_export, trained_run, tmp_path):
    """The site is the page's files, onnxruntime-web's WebAssembly backend (its glue module named .js, a type every
    host knows) and model.onnx, and a manifest giving each one's sha256: nothing else, no temporary folder."""
    needs_onnxruntime_web()
    result = run_export(checkpoint_in(trained_run, tmp_path / "run"), "--format", "web", "--out", tmp_path / "web")
    assert result.returncode == 0, result.stderr
    names = {p.name for p in (tmp_path / "web").iterdir()}
    assert names == {*export.SITE, export.MODEL_FILE, export.INSIDE_FILE, export.MANIFEST}
    assert not any(name.endswith((".mjs", ".map")) or "jsep" in name or "webgpu" in name for name in names)
    assert (tmp_path / "web" / "index.html").read_bytes() == (export.STATIC / "index.html").read_bytes()
    manifest = json.loads((tmp_path / "web" / export.MANIFEST).read_text())
    assert manifest["files"] == {name: export.sha256(tmp_path / "web" / name) for name in names - {export.MANIFEST}}
    assert "pending" not in manifest
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "web"]
    assert "--bind 127.0.0.1" in result.stdout


# --- writing into a folder that holds other things -------------------------------------------


@pytest.fixture
def sources(tmp_path_factory, monkeypatch):
    """Stand-ins for the site's source files, so that no onnxruntime-web is needed: set(version) gives them that
    version's contents and can add or drop a file, as a new version of the page or of onnxruntime-web does."""
    folder, names = tmp_path_factory.mktemp("sources"), list(export.SITE)

    class Sources:
        def set(self, version, extra=(), drop=()):
            site = {}
            for name in [*(n for n in names if n not in drop), *extra]:
                site[name] = folder / version / name
                site[name].parent.mkdir(exist_ok=True)
                site[name].write_text(f"{name} of {version}")
            monkeypatch.setattr(export, "SITE", site)

        def files(self, model):
            """What the site's files hold once the current version is exported with `model`."""
            return {name: source.read_bytes() for name, source in export.SITE.items()} | {export.MODEL_FILE: model}

    sources = Sources()
    sources.set("v1")
    return sources


def files(folder):
    """Every file under `folder` (through links), by path relative to it, with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def users_things(folder):
    """A folder a user deploys from: a .git folder, a CNAME, a README and notes of their own."""
    (folder / ".git" / "objects").mkdir(parents=True)
    (folder / ".git" / "HEAD").write_text("ref: refs/heads/gh-pages\n")
    (folder / ".git" / "objects" / "ab").write_bytes(b"\x00blob")
    (folder / "CNAME").write_text("digits.example.org\n")
    (folder / "README.md").write_text("# my site\n")
    (folder / "notes").mkdir()
    (folder / "notes" / "todo.txt").write_text("keep me")
    return files(folder)


def test_a_new_export_replaces_only_the_files_an_earlier_export_wrote(tmp_path, sources):
    """An export into a folder with a .git, a CNAME, a README and notes leaves them all as they were; a second
    export replaces the first's files and removes those it no longer writes (its manifest lists them); no
    temporary file or folder is left."""
    users = users_things(tmp_path)
    sources.set("v1", extra=["stale.js"])
    export.write_site(tmp_path, b"model 1")
    assert (tmp_path / "stale.js").read_text() == "stale.js of v1"
    sources.set("v2")
    export.write_site(tmp_path, b"model 2")
    after = files(tmp_path)
    assert {name: after[name] for name in users} == users
    assert (tmp_path / export.MODEL_FILE).read_bytes() == b"model 2"
    assert all((tmp_path / name).read_text() == f"{name} of v2" for name in export.SITE)
    assert set(after) == {*users, *export.SITE, export.MODEL_FILE, export.MANIFEST}  # stale.js is gone
    assert set(json.loads((tmp_path / export.MANIFEST).read_text())["files"]) == {*export.SITE, export.MODEL_FILE}


def test_a_site_file_changed_since_the_export_is_refused_not_overwritten(tmp_path, sources):
    """A file that an earlier export wrote and the user then changed (or a file of theirs in place of one no longer
    written) is the user's now: the export names it and changes nothing."""
    export.write_site(tmp_path / "web", b"model 1")
    for name, drop in (("index.html", ()), ("demo.css", ["demo.css"])):
        (tmp_path / "web" / name).write_text("edited by hand")
        before = files(tmp_path)
        sources.set("v2", drop=drop)
        with pytest.raises(export.UserError, match=str(tmp_path / "web" / name)):
            export.write_site(tmp_path / "web", b"model 2")
        assert files(tmp_path) == before
        (tmp_path / "web" / name).unlink()


def test_an_export_through_a_linked_folder_writes_into_its_target_and_keeps_the_link(tmp_path, sources):
    """--out that is a symbolic link to a folder: the site goes into the link's target, beside the files there,
    and the link stays a link, with nothing left beside it."""
    (tmp_path / "target").mkdir()
    users = users_things(tmp_path / "target")
    (tmp_path / "site").symlink_to(tmp_path / "target")
    for version in ("v1", "v2"):
        sources.set(version)
        export.write_site(tmp_path / "site", version.encode())
    assert (tmp_path / "site").is_symlink() and (tmp_path / "site").resolve() == tmp_path / "target"
    assert (tmp_path / "target" / export.MODEL_FILE).read_bytes() == b"v2"
    assert {name: files(tmp_path / "target")[name] for name in users} == users
    assert sorted(p.name for p in tmp_path.iterdir()) == ["site", "target"]


LEGACY_MODEL = export.INPUT.encode() + b" checkpoint_sha256"  # the metadata strings of export.py's ONNX files


def legacy_site(folder, model=LEGACY_MODEL):
    """A site as export.py wrote it before manifests: exactly LEGACY_SITE, its model.onnx holding its metadata."""
    folder.mkdir()
    for name in export.LEGACY_SITE:
        (folder / name).write_text(f"old {name}")
    (folder / export.MODEL_FILE).write_bytes(model)


def test_a_site_exported_before_manifests_is_replaced_only_if_it_is_exactly_one(tmp_path, sources):
    """A folder of exactly the files an export wrote before manifests, model.onnx one of export.py's, is replaced
    whole (the glue's old .mjs name too); one with anything beside them, or another model.onnx, is refused."""
    legacy_site(tmp_path / "old")
    export.write_site(tmp_path / "old", b"new model")
    assert files(tmp_path / "old").keys() == sources.files(b"new model").keys() | {export.MANIFEST}
    for name, model, extra in (("with CNAME", LEGACY_MODEL, "CNAME"), ("other model", b"another onnx", None)):
        legacy_site(tmp_path / name, model)
        if extra:
            (tmp_path / name / extra).write_text("mine")
        before = files(tmp_path / name)
        with pytest.raises(export.UserError, match="not a file that an earlier export wrote"):
            export.write_site(tmp_path / name, b"new model")
        assert files(tmp_path / name) == before


def test_a_damaged_manifest_is_refused_in_one_line(tmp_path, sources):
    """A manifest that export.py did not write (not JSON, or naming a file outside the folder) is named and nothing
    is touched: it cannot prove which files are the export's."""
    export.write_site(tmp_path / "web", b"model")
    manifest = tmp_path / "web" / export.MANIFEST
    for text in ("{not json", json.dumps({"files": {"../outside.txt": "0" * 64}})):
        manifest.write_text(text)
        before = files(tmp_path)
        with pytest.raises(export.UserError, match=re.escape(f"{manifest} is not a manifest that export.py wrote")):
            export.write_site(tmp_path / "web", b"model 2")
        assert files(tmp_path) == before


def at_call(call, n, action):
    """`call` (os.replace or os.fsync), but at its n-th call from now it does action() first: fail, or die."""
    count = iter(range(1, 1000))

    def wrapped(*args):
        if next(count) == n:
            action()
        return call(*args)

    return wrapped


def no_space():
    raise OSError(28, "No space left on device")


def kill_this_process():
    os.kill(os.getpid(), signal.SIGKILL)


def test_a_failed_write_leaves_the_earlier_site_whole(tmp_path, sources, monkeypatch):
    """A failure while reading the sources, staging the files, or moving them in (putting back what was moved)
    leaves the earlier site and its manifest as they were, with one error and no temporary folder; into a new
    folder, it leaves nothing."""
    users = users_things(tmp_path)
    export.write_site(tmp_path, b"model 1")
    before = files(tmp_path)
    sources.set("v2", extra=["new.js"])
    for fail in ("reading", "staging", "moving"):
        with monkeypatch.context() as m:
            if fail == "reading":
                m.setitem(export.SITE, "prepare.js", tmp_path / "gone" / "prepare.js")
            elif fail == "staging":  # the first two fsyncs are the manifest's, the third is the first staged file's
                m.setattr(export.os, "fsync", at_call(os.fsync, 3, no_space))
            else:  # replace 1 puts the manifest under way; then, by name, each earlier file is moved aside and the
                # new one in: 12 is new.js, which has no earlier file, so 13 fails after a new file has come in
                m.setattr(export.os, "replace", at_call(os.replace, 13, no_space))
            with pytest.raises(export.UserError, match="nothing there has changed"):
                export.write_site(tmp_path, b"model 2")
        assert files(tmp_path) == before, fail
    assert {name: before[name] for name in users} == users
    monkeypatch.setitem(export.SITE, "prepare.js", tmp_path / "gone" / "prepare.js")
    with pytest.raises(export.UserError, match="nothing there has changed"):
        export.write_site(tmp_path / "new", b"model")
    assert not (tmp_path / "new").exists()


# Where a kill -9 meets an export that replaces a site of 10 files with one of 10 (a file dropped, one added), by
# the n-th call to os.fsync or os.replace: 2 fsyncs and 1 replace write the manifest under way; then one fsync per
# staged file; then 20 replaces move each earlier file aside and each new one in; the last replace, the manifest.
KILLS = {
    "staging": ("fsync", 4),
    "the first move": ("replace", 2),
    "moving": ("replace", 9),
    "the last": ("replace", 22),
}


@pytest.mark.parametrize("kill_at", KILLS)
def test_an_export_killed_under_way_leaves_whole_files_and_the_next_one_finishes(tmp_path, sources, kill_at):
    """kill -9 at any moment of an export leaves every site file whole, of the earlier site or of the new one (the
    earlier site whole while staging), and the user's files as they were; the next export then finishes: exactly
    its files and the user's, and no staging folder."""
    users = users_things(tmp_path)
    export.write_site(tmp_path, b"model 1")
    earlier = sources.files(b"model 1")
    sources.set("v2", extra=["new.js"], drop=["demo.css"])
    new = sources.files(b"model 2")
    call, n = KILLS[kill_at]
    pid = os.fork()
    if pid == 0:  # the child: the export, killed by SIGKILL at that call, with no chance to clean up
        try:
            setattr(export.os, call, at_call(getattr(os, call), n, kill_this_process))
            export.write_site(tmp_path, b"model 2")
        finally:
            os._exit(3)  # not killed: the kill point was never reached
    deadline = time.monotonic() + 60
    while (ended := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    if ended[0] == 0:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    assert os.WIFSIGNALED(ended[1]) and os.WTERMSIG(ended[1]) == signal.SIGKILL, ended
    left = files(tmp_path)
    assert {name: left[name] for name in users} == users
    for name in earlier.keys() | new.keys():
        assert left.get(name) in (earlier.get(name), new.get(name)), name
    if kill_at == "staging":
        assert {name: left.get(name) for name in earlier.keys() | new.keys()} == {
            name: earlier.get(name) for name in earlier.keys() | new.keys()
        }
    export.write_site(tmp_path, b"model 2")
    assert files(tmp_path) == users | new | {export.MANIFEST: (tmp_path / export.MANIFEST).read_bytes()}


# --- the views of the network's inside -------------------------------------------------------


def test_the_sites_model_gives_every_layer_and_inside_json_the_filters(run_export, trained_run, tmp_path):
    """The site's model.onnx outputs logits, conv1 and conv2 by name, each layer_outputs' on the same digits, and
    says so in its metadata; inside.json holds conv1's weights and the occlusion's patch, and the manifest lists it."""
    import numpy as np
    import onnx
    import onnxruntime
    import torch

    from model import OCCLUSION_STRIDE, OCCLUSION_WINDOW, layer_outputs, load_checkpoint

    needs_onnxruntime_web()
    checkpoint = checkpoint_in(trained_run, tmp_path / "run")
    result = run_export(checkpoint, "--format", "web", "--out", tmp_path / "web")
    assert result.returncode == 0, result.stderr
    assert re.search(r"max \|conv1 difference\| \S+ \(tolerance 1e-04\)", result.stdout)
    assert re.search(r"max \|conv2 difference\| \S+ \(tolerance 1e-04\)", result.stdout)
    proto = onnx.load(tmp_path / "web" / export.MODEL_FILE)
    assert [o.name for o in proto.graph.output] == ["logits", "conv1", "conv2"]
    output = {p.key: p.value for p in proto.metadata_props}["output"]
    assert "conv1: float32 (N, 10, 12, 12)" in output and "conv2: float32 (N, 20, 4, 4)" in output
    model = load_checkpoint(checkpoint)[0]
    digits = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (3, 28, 28), dtype=np.uint8))
    session = onnxruntime.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, {"pixels": (digits.unsqueeze(1).float() / 255).numpy()})
    expected = layer_outputs(model, digits)
    for name, value in zip(["logits", "conv1", "conv2"], got):
        assert np.allclose(value, expected[name].numpy(), atol=export.TOLERANCE), name
    inside = json.loads((tmp_path / "web" / export.INSIDE_FILE).read_text())
    assert inside["model"] == "cnn" and (inside["window"], inside["stride"]) == (OCCLUSION_WINDOW, OCCLUSION_STRIDE)
    assert np.allclose(inside["filters"], model.conv1.weight.detach().reshape(10, 25).numpy())
    manifest = json.loads((tmp_path / "web" / export.MANIFEST).read_text())
    assert manifest["files"][export.INSIDE_FILE] == export.sha256(tmp_path / "web" / export.INSIDE_FILE)


def test_a_site_whose_maps_disagree_is_not_written(run_export, trained_run, tmp_path, monkeypatch):
    """If the exported conv2 maps differ from the checkpoint's by more than the tolerance, the export fails in one
    line naming them, and no site is written."""
    needs_onnxruntime_web()
    real = export.layer_outputs

    def shifted(model, images):
        layers = real(model, images)
        return layers | {"conv2": layers["conv2"] + 0.5}

    monkeypatch.setattr(export, "layer_outputs", shifted)
    result = run_export(checkpoint_in(trained_run, tmp_path / "run"), "--format", "web")
    using, line = result.stderr.splitlines()  # the checkpoint it exported, then why nothing was written
    assert result.returncode == 2 and using.startswith("using ") and line.startswith("error: ")
    assert "conv2 outputs differ from the checkpoint's by 5.00e-01, more than 1e-04" in line and "not written" in line
    assert not (tmp_path / "run" / "web").exists()
