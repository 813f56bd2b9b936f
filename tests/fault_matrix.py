"""The fault matrix: hostile and damaged inputs, each run through the `graft` command line.

One `World` of real artifacts is built once (tiny models, an adapter, SkillPacks signed and not, a
grafted checkpoint, a routed model, keys, data, jobs). Each `Case` copies what it damages into a
folder of its own, names the command to run, and says what must happen: a refusal (exit code and a
pattern the one stderr line must match, naming the file and the field) with nothing on disk changed,
or a success that changes only the paths it names. `verdict` judges one run; `tests/test_faults.py`
runs every case in-process and `benchmarks/faults.py` runs them as subprocesses.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path

from tests.conftest import REPO, make_adapter, make_base

# ------------------------------------------------------------------------------------------ the world


@dataclass(frozen=True)
class World:
    """Pristine inputs every case reads; cases copy before they damage anything."""

    root: Path

    def __getattr__(self, name: str) -> Path:  # world.base, world.pack, ...: folders and files under root
        return self.root / name.replace("_", "-")


def _rows(words: list[str], fmt: str) -> str:
    return "".join(json.dumps({"prompt": fmt.format(w), "answer": " " + w[::-1]}) + "\n" for w in words)


def build_world(root: Path) -> World:
    """Every artifact the cases need, made through graftline's library (a few seconds at these sizes)."""
    from graft.checkpoint import CheckpointReader
    from graft.fingerprint import base_fingerprint
    from graft.grafting import graft
    from graft.lora import read_lora_deltas
    from graft.routing import build_routed
    from graft.signing import generate_keypair
    from graft.skillpack import PackSettings, pack_skill

    root.mkdir(parents=True, exist_ok=True)
    w = World(root)
    make_base(w.base)
    make_base(w.base_v2, seed=7)
    make_base(w.base_gpt2, family="gpt2")
    make_adapter(w.base, w.adapter)
    make_adapter(w.base, w.adapter_b, seed=2)
    settings = PackSettings(energy=1.0, bits=(8,), band_fractions=(1.0,))
    deltas = read_lora_deltas(w.adapter)
    pack = pack_skill("rev", deltas, base_fingerprint(CheckpointReader(w.base), list(deltas)), settings)
    pack.save(w.pack)
    deltas_b = read_lora_deltas(w.adapter_b)
    other = pack_skill("sort", deltas_b, base_fingerprint(CheckpointReader(w.base), list(deltas_b)), settings)
    other.save(w.pack_b)
    generate_keypair(w.keys / "graftline.key", w.keys / "graftline.pub")
    generate_keypair(w.keys / "other.key", w.keys / "other.pub")
    pack.save(w.pack_signed, sign_with=w.keys / "graftline.key")
    graft(w.base, [pack], w.grafted)
    words = ["abc", "hello", "graft", "xyz", "moon", "tree", "lamp", "river", "stone", "cloud"]
    w.data.mkdir()
    (w.data / "rev.jsonl").write_text(_rows(words, "rev {} ="))
    (w.data / "general.jsonl").write_text(_rows(words, "{} is a word."))
    routed = build_routed(w.base, [pack], {"rev": [f"rev {x} =" for x in words], "none": [f"{x} is a word." for x in words]},
                          steps=20)
    routed.save(w.routed)
    pickle_base = w.pickle_base
    pickle_base.mkdir()
    shutil.copy(w.base / "config.json", pickle_base / "config.json")
    (pickle_base / "pytorch_model.bin").write_bytes(b"\x80\x04 a pickle payload that must never be read")
    pickle_adapter = w.pickle_adapter
    pickle_adapter.mkdir()
    shutil.copy(w.adapter / "adapter_config.json", pickle_adapter / "adapter_config.json")
    (pickle_adapter / "adapter_model.bin").write_bytes(b"\x80\x04 a pickle payload")
    w.jobs.mkdir()
    (w.jobs / "ok.yaml").write_text("name: ok\nskills: [{name: reverse}]\n")
    (w.merge_yaml).write_text(f"merge_method: linear\nmodels:\n  - model: {w.base}\n    parameters: {{weight: 0.5}}\n"
                              f"  - model: {w.base_v2}\n    parameters: {{weight: 0.5}}\n")
    return w


# ------------------------------------------------------------------------------------------- helpers


def copy(src: Path, case: Path, name: str | None = None) -> Path:
    dst = case / (name or src.name)
    shutil.copytree(src, dst) if src.is_dir() else shutil.copy(src, dst)
    return dst


def rehash(folder: Path, manifest: str = "skillpack.json") -> None:
    """Recompute a folder's checksums and content hash, as an attacker who knows the format would."""
    from graft.artifacts import manifest_hash, payload_checksums
    from graft.atomic import MARKER
    from graft.signing import SIGNATURE

    m = json.loads((folder / manifest).read_text())
    if isinstance(m, dict):
        if "checksums" in m:
            m["checksums"] = payload_checksums(folder, frozenset({manifest, MARKER, SIGNATURE}))
        m["content_hash"] = manifest_hash(m)
    (folder / manifest).write_text(json.dumps(m))


def edit_json(path: Path, change: Callable[[dict], object], rehash_after: bool = True) -> None:
    m = json.loads(path.read_text())
    out = change(m)
    path.write_text(json.dumps(m if out is None else out))
    if rehash_after and isinstance(m if out is None else out, dict):
        rehash(path.parent, path.name)


def first_svd_key(pack: Path) -> str:
    m = json.loads((pack / "skillpack.json").read_text())
    return next(k for k, e in m["tensors"].items() if e["scheme"] == "svd_quant")


def rewrite_payload(pack: Path, change: Callable[[dict], dict]) -> None:
    """Rewrite pack.safetensors through `change` (a dict of tensors), then rehash."""
    from safetensors.torch import load_file, save_file

    tensors = change(load_file(str(pack / "pack.safetensors")))
    save_file(tensors, str(pack / "pack.safetensors"))
    rehash(pack)


def user_folder(case: Path, name: str = "mywork") -> Path:
    """A folder a user made, with something in it that must survive."""
    d = case / name
    d.mkdir()
    (d / "notes.txt").write_text("my notes: not graftline's")
    return d


def job(case: Path, text: str, name: str = "job.yaml") -> Path:
    path = case / name
    path.write_text(text)
    return path


def _scale_rows(base: Path, key: str, first_row: int, factor: float) -> None:
    """Multiply rows `first_row`+ of one tensor of a checkpoint in place (a base that was tampered with)."""
    from safetensors.torch import load_file, save_file

    path = base / "model.safetensors"
    t = load_file(str(path))
    t[key][first_row:] *= factor
    save_file(t, str(path), metadata={"format": "pt"})


# ------------------------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class Expect:
    """What a run must do: exit `code`; for a refusal, one stderr line matching `message`; only `changes` on disk."""

    code: int
    message: str | None = None
    changes: tuple[str, ...] = ()  # globs, relative to the case folder, that may appear or change
    check: Callable[[World, Path], None] | None = None  # more to assert after a success


@dataclass(frozen=True)
class Case:
    name: str
    group: str
    prepare: Callable[[World, Path], list[str]]  # argv after `graft`; may create and damage files under the case folder
    expect: Expect
    cwd: Callable[[World, Path], Path] | None = None
    slow: bool = False


def refused(message: str, code: int = 2) -> Expect:
    return Expect(code, message)


CASES: list[Case] = []


def case(name: str, group: str, expect: Expect, cwd: Callable[[World, Path], Path] | None = None, slow: bool = False):
    def add(fn: Callable[[World, Path], list[str]]) -> Callable:
        CASES.append(Case(name, group, fn, expect, cwd, slow))
        return fn
    return add


# --- 1. outputs never destroy what graftline did not write ---------------------------------------

OUT_EXISTS = r"mywork: already exists; pass --overwrite"
NOT_OURS = r"mywork: exists and was not written by graftline"


@case("apply --out existing user folder", "outputs", refused(OUT_EXISTS))
def _(w, d):
    return ["apply", str(w.base), str(w.pack), "--out", str(user_folder(d))]


@case("apply --out user folder --overwrite", "outputs", refused(NOT_OURS))
def _(w, d):
    return ["apply", str(w.base), str(w.pack), "--out", str(user_folder(d)), "--overwrite"]


@case("merge OUT existing user folder", "outputs", refused(OUT_EXISTS))
def _(w, d):
    return ["merge", str(w.merge_yaml), str(user_folder(d))]


@case("merge OUT user folder --overwrite", "outputs", refused(NOT_OURS))
def _(w, d):
    return ["merge", str(w.merge_yaml), str(user_folder(d)), "--overwrite"]


@case("pack --out existing user folder", "outputs", refused(OUT_EXISTS))
def _(w, d):
    return ["pack", str(w.adapter), "--base", str(w.base), "--out", str(user_folder(d))]


@case("route --out existing user folder", "outputs", refused(OUT_EXISTS))
def _(w, d):
    return ["route", str(w.base), str(w.pack), "--out", str(user_folder(d)), "--prompts", f"rev={w.data / 'rev.jsonl'}",
            f"none={w.data / 'general.jsonl'}"]


@case("score --out existing user folder", "outputs", refused(OUT_EXISTS))
def _(w, d):
    return ["score", str(w.adapter), "--base", str(w.base), "--data", str(w.data / "rev.jsonl"), "--out", str(user_folder(d))]


@case("remove --out existing user folder", "outputs", refused(OUT_EXISTS))
def _(w, d):
    return ["remove", str(w.grafted), str(w.pack), "--out", str(user_folder(d))]


@case("merge-adapters --out existing user folder", "outputs", refused(OUT_EXISTS))
def _(w, d):
    return ["merge-adapters", str(w.adapter), str(w.adapter_b), "--out", str(user_folder(d))]


@case("apply --out a folder holding the base and the pack, --overwrite", "outputs", refused(r"work: holds an input of this command"))
def _(w, d):
    work = d / "work"
    base, pack = copy(w.base, work.mkdir() or work), copy(w.pack, work)
    (work / "_graftline.json").write_text(json.dumps({"format": "graftline.output", "version": 1}))  # even if it looks like ours
    return ["apply", str(base), str(pack), "--out", str(work), "--overwrite"]


@case("apply --out . (the working directory)", "outputs", refused(r"\.: is the working directory"), cwd=lambda w, d: d)
def _(w, d):
    return ["apply", str(w.base), str(w.pack), "--out", "."]


@case("apply --out .. (above the working directory)", "outputs", refused(r"\.\.: is the working directory or above it"),
      cwd=lambda w, d: (d / "sub").mkdir() or d / "sub")
def _(w, d):
    return ["apply", str(w.base), str(w.pack), "--out", "..", "--overwrite"]


@case("apply --out the base itself, --overwrite", "outputs", refused(r"base: holds an input of this command"))
def _(w, d):
    return ["apply", str(copy(w.grafted, d, "base")), str(w.pack), "--out", str(d / "base"), "--overwrite"]


@case("pack --out the adapter itself, --overwrite", "outputs", refused(r"adapter: holds an input of this command"))
def _(w, d):
    return ["pack", str(copy(w.adapter, d)), "--base", str(w.base), "--out", str(d / "adapter"), "--overwrite"]


@case("merge OUT one of its models, --overwrite", "outputs", refused(r"holds an input of this command"))
def _(w, d):
    return ["merge", str(w.merge_yaml), str(w.base), "--overwrite"]


@case("apply --out an existing file", "outputs", refused(r"out.txt: exists and is not a folder graftline wrote"))
def _(w, d):
    (d / "out.txt").write_text("a file of mine")
    return ["apply", str(w.base), str(w.pack), "--out", str(d / "out.txt"), "--overwrite"]


@case("apply --out a symlink to a user folder, --overwrite", "outputs", refused(r"link: is a symbolic link"))
def _(w, d):
    (d / "link").symlink_to(user_folder(d))
    return ["apply", str(w.base), str(w.pack), "--out", str(d / "link"), "--overwrite"]


@case("apply --out graftline's own earlier output, no --overwrite", "outputs", refused(r"grafted: already exists; pass --overwrite"))
def _(w, d):
    return ["apply", str(w.base), str(w.pack), "--out", str(copy(w.grafted, d))]


@case("apply --out graftline's own earlier output, --overwrite", "outputs",
      Expect(0, changes=("grafted", "grafted/*")))
def _(w, d):
    return ["apply", str(w.base), str(w.pack), "--out", str(copy(w.grafted, d)), "--overwrite"]


def _swept(w: World, d: Path) -> None:
    assert not list(d.glob(".tmp-*")), f"leftovers remain: {sorted(p.name for p in d.iterdir())}"


@case("a leftover .tmp folder of a killed writer is swept by the next write", "outputs",
      Expect(0, changes=("out", "out/*", ".tmp-*"), check=_swept))
def _(w, d):
    script = (f"import os\nfrom graft.atomic import atomic_dir\nwith atomic_dir({str(d / 'out')!r}) as t:\n"
              "    (t / 'model.safetensors').write_bytes(b'half'); os.kill(os.getpid(), 9)\n")
    subprocess.run([sys.executable, "-c", script], cwd=REPO, check=False)
    assert list(d.glob(".tmp-out-*")), "the killed writer left no temporary folder to sweep"
    return ["apply", str(w.base), str(w.pack), "--out", str(d / "out")]


# --- 2. silent wrong results become errors --------------------------------------------------------

@case("pack entry for a tensor the base lacks", "partial",
      refused(r"tensor 'model\.layers\.9\.mlp\.down_proj\.weight' is missing from the base"))
def _(w, d):
    pack = copy(w.pack, d)
    key = first_svd_key(pack)
    ghost = "model.layers.9.mlp.down_proj.weight"

    def add(m):
        m["tensors"][ghost] = {**m["tensors"][key], "stored": [s.replace(key, ghost) for s in m["tensors"][key]["stored"]]}
        m["base_fingerprint"]["shapes"][ghost] = m["base_fingerprint"]["shapes"][key]
        m["base_fingerprint"]["tensors_sha256"][ghost] = m["base_fingerprint"]["tensors_sha256"][key]
    rewrite_payload(pack, lambda t: {**t, **{k.replace(key, ghost): v.clone() for k, v in t.items() if k.startswith(key + "::")}})
    edit_json(pack / "skillpack.json", add)
    return ["apply", str(w.base), str(pack), "--out", str(d / "out")]


@case("pack made for another architecture", "partial", refused(r"does not fit base .*base-gpt2"))
def _(w, d):
    return ["apply", str(w.base_gpt2), str(w.pack), "--out", str(d / "out")]


@case("remove a pack that was never grafted", "partial", refused(r"pack 'sort' is not recorded as grafted into"))
def _(w, d):
    return ["remove", str(w.grafted), str(w.pack_b), "--out", str(d / "out")]


@case("remove from a base nothing was grafted into", "partial", refused(r"pack 'rev' is not recorded as grafted into .*base"))
def _(w, d):
    return ["remove", str(w.base), str(w.pack), "--out", str(d / "out")]


@case("remove at another scale than it was grafted with", "partial", refused(r"was grafted at scale 1, not 2"))
def _(w, d):
    return ["remove", str(w.grafted), str(w.pack), "--out", str(d / "out"), "--scale", "2"]


@case("remove a grafted pack", "partial", Expect(0, changes=("out", "out/*")))
def _(w, d):
    return ["remove", str(w.grafted), str(w.pack), "--out", str(d / "out")]


@case("base with rows 40+ of q_proj multiplied by -5", "partial",
      refused(r"differs from the base the pack was made for \(tensor 'model\.layers\.0\.self_attn\.q_proj\.weight' changed\)"))
def _(w, d):
    base = copy(w.base, d)
    _scale_rows(base, "model.layers.0.self_attn.q_proj.weight", 40, -5.0)
    return ["apply", str(base), str(w.pack), "--out", str(d / "out")]


@case("grafted checkpoint edited after graftline wrote it", "partial",
      refused(r"graftline_grafts.json: no longer describes the checkpoint"))
def _(w, d):
    grafted = copy(w.grafted, d)
    _scale_rows(grafted, "model.layers.0.self_attn.q_proj.weight", 0, 1.5)
    return ["remove", str(grafted), str(w.pack), "--out", str(d / "out")]


@case("graft record that is not a record", "partial", refused(r"graftline_grafts.json: packs: Input should be a valid list"))
def _(w, d):
    grafted = copy(w.grafted, d)
    edit_json(grafted / "graftline_grafts.json", lambda m: m.update(packs={"rev": 1}), rehash_after=False)
    return ["remove", str(grafted), str(w.pack), "--out", str(d / "out")]


# --- 3. integrity that cannot be bypassed ---------------------------------------------------------

@case("a file added to a pack folder", "integrity", refused(r"extra.py: not covered by the checksums in skillpack.json"))
def _(w, d):
    pack = copy(w.pack, d)
    (pack / "extra.py").write_text("print('hi')")
    return ["inspect", str(pack)]


@case("empty checksum map (hashes recomputed)", "integrity", refused(r"skillpack.json: checksums: .*at least 1 item"))
def _(w, d):
    from graft.artifacts import manifest_hash

    pack = copy(w.pack, d)
    m = json.loads((pack / "skillpack.json").read_text())
    m["checksums"] = {}
    m["content_hash"] = manifest_hash(m)
    (pack / "skillpack.json").write_text(json.dumps(m))
    return ["inspect", str(pack)]


def _with_checksum_path(path: str):
    def prepare(w, d):
        pack = copy(w.pack, d)
        m = json.loads((pack / "skillpack.json").read_text())
        m["checksums"][path] = "0" * 64
        from graft.artifacts import manifest_hash
        m["content_hash"] = manifest_hash(m)
        (pack / "skillpack.json").write_text(json.dumps(m))
        return ["inspect", str(pack)]
    return prepare


case("checksum path ../../etc/hostname", "integrity", refused(r"skillpack.json: checksums.*is not a path inside the folder"))(
    _with_checksum_path("../../etc/hostname"))
case("checksum path /etc/hostname", "integrity", refused(r"skillpack.json: checksums.*is not a path inside the folder"))(
    _with_checksum_path("/etc/hostname"))


def _skill_named(name: str):
    def prepare(w, d):
        pack = copy(w.pack, d)
        edit_json(pack / "skillpack.json", lambda m: m.update(skill=name))
        return ["inspect", str(pack)]
    return prepare


case("skill name ../../evil in a pack", "integrity", refused(r"skillpack.json: skill: '\.\./\.\./evil' is not a safe name"))(
    _skill_named("../../evil"))
case("skill name none in a pack", "integrity", refused(r"skillpack.json: skill: 'none' is not a safe name"))(_skill_named("none"))


@case("manifest edited, hashes left", "integrity", refused(r"skillpack.json: content_hash: does not match"))
def _(w, d):
    pack = copy(w.pack, d)
    edit_json(pack / "skillpack.json", lambda m: m.update(total_bytes=1), rehash_after=False)
    return ["inspect", str(pack)]


@case("manifest: tensors is a list", "integrity", refused(r"skillpack.json: tensors: Input should be a valid dictionary"))
def _(w, d):
    pack = copy(w.pack, d)
    edit_json(pack / "skillpack.json", lambda m: m.update(tensors=list(m["tensors"])))
    return ["inspect", str(pack)]


@case("manifest: a list at the top level", "integrity", refused(r"skillpack.json: expected a JSON object at the top level"))
def _(w, d):
    pack = copy(w.pack, d)
    (pack / "skillpack.json").write_text("[1, 2]")
    return ["inspect", str(pack)]


@case("manifest: not JSON", "integrity", refused(r"skillpack.json: not valid JSON"))
def _(w, d):
    pack = copy(w.pack, d)
    (pack / "skillpack.json").write_text("{not json")
    return ["inspect", str(pack)]


@case("manifest: no checksums", "integrity", refused(r"skillpack.json: checksums: missing"))
def _(w, d):
    pack = copy(w.pack, d)
    edit_json(pack / "skillpack.json", lambda m: m.pop("checksums") and None)
    return ["inspect", str(pack)]


@case("manifest: unknown compression scheme", "integrity", refused(r"tensors\..*\.scheme: unknown compression scheme 'zip'"))
def _(w, d):
    pack = copy(w.pack, d)
    edit_json(pack / "skillpack.json", lambda m: next(iter(m["tensors"].values())).update(scheme="zip"))
    return ["inspect", str(pack)]


@case("manifest: wrong shape for a tensor", "integrity", refused(r"skillpack.json: tensors: .* has shape \[3, 3\], base_fingerprint says"))
def _(w, d):
    pack = copy(w.pack, d)
    edit_json(pack / "skillpack.json", lambda m: next(iter(m["tensors"].values())).update(shape=[3, 3]))
    return ["inspect", str(pack)]


@case("manifest: a band of 9 bits", "integrity", refused(r"tensors\..*bands\[0\]\.bits: Input should be less than or equal to 8"))
def _(w, d):
    pack = copy(w.pack, d)
    key = first_svd_key(pack)
    edit_json(pack / "skillpack.json", lambda m: m["tensors"][key]["bands"][0].update(bits=9))
    return ["inspect", str(pack)]


@case("manifest: format v2 (leading-row fingerprints)", "integrity", refused(r"format_version: format v2 is no longer accepted"))
def _(w, d):
    pack = copy(w.pack, d)
    edit_json(pack / "skillpack.json", lambda m: m.update(format_version=2))
    return ["inspect", str(pack)]


@case("manifest: another format", "integrity", refused(r"skillpack.json: format: Input should be 'graftline.skillpack'"))
def _(w, d):
    pack = copy(w.pack, d)
    edit_json(pack / "skillpack.json", lambda m: m.update(format="safetensors.other"))
    return ["inspect", str(pack)]


@case("manifest: an entry claims another entry's tensors", "integrity", refused(r"lists stored tensors of another entry"))
def _(w, d):
    pack = copy(w.pack, d)

    def swap(m):
        a, b = list(m["tensors"])[:2]
        m["tensors"][a]["stored"] = m["tensors"][b]["stored"]
    edit_json(pack / "skillpack.json", swap)
    return ["inspect", str(pack)]


@case("pack.safetensors truncated (checksums recomputed)", "integrity", refused(r"pack.safetensors: not a readable safetensors file"))
def _(w, d):
    pack = copy(w.pack, d)
    data = (pack / "pack.safetensors").read_bytes()
    (pack / "pack.safetensors").write_bytes(data[: len(data) // 2])
    rehash(pack)
    return ["inspect", str(pack)]


@case("pack.safetensors with a header of garbage (checksums recomputed)", "integrity",
      refused(r"pack.safetensors: not a readable safetensors file"))
def _(w, d):
    pack = copy(w.pack, d)
    (pack / "pack.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{{{{{{{{{{{{{{{{" + b"\x00" * 64)
    rehash(pack)
    return ["inspect", str(pack)]


@case("pack.safetensors: codes of the wrong dtype (checksums recomputed)", "integrity",
      refused(r"pack.safetensors: tensor .*codes' is F32"))
def _(w, d):
    pack = copy(w.pack, d)
    rewrite_payload(pack, lambda t: {k: (v.float() if k.endswith(".codes") else v) for k, v in t.items()})
    return ["inspect", str(pack)]


@case("pack.safetensors: codes cut short (checksums recomputed)", "integrity", refused(r"pack.safetensors: tensor .*codes' is U8 \["))
def _(w, d):
    pack = copy(w.pack, d)
    rewrite_payload(pack, lambda t: {k: (v[:3].clone() if k.endswith(".codes") else v) for k, v in t.items()})
    return ["inspect", str(pack)]


@case("pack.safetensors: a tensor no entry owns (checksums recomputed)", "integrity", refused(r"belongs to no manifest entry"))
def _(w, d):
    import torch

    pack = copy(w.pack, d)
    rewrite_payload(pack, lambda t: {**t, "payload::x": torch.zeros(4)})
    return ["inspect", str(pack)]


@case("routed.json edited, hashes left", "integrity", refused(r"routed.json: content_hash: does not match"))
def _(w, d):
    routed = copy(w.routed, d)
    edit_json(routed / "routed.json", lambda m: m["router"].update(layer=0), rehash_after=False)
    return ["inspect", str(routed)]


@case("routed.json granting itself base drift", "integrity", refused(r"routed.json: allow_base_drift: unknown field"))
def _(w, d):
    routed = copy(w.routed, d)
    edit_json(routed / "routed.json", lambda m: m.update(allow_base_drift=True))
    return ["inspect", str(routed)]


@case("routed.json naming a pack ../../x", "integrity", refused(r"routed.json: packs\[0\]: '\.\./\.\./x' is not a safe name"))
def _(w, d):
    routed = copy(w.routed, d)
    edit_json(routed / "routed.json", lambda m: m.update(packs=["../../x"]))
    return ["inspect", str(routed)]


@case("routed folder with a file added", "integrity", refused(r"packs/rev/notes.txt: not covered by the checksums in routed.json"))
def _(w, d):
    routed = copy(w.routed, d)
    (routed / "packs" / "rev" / "notes.txt").write_text("x")
    return ["inspect", str(routed)]


@case("routed router.safetensors modified", "integrity", refused(r"router.safetensors: checksum mismatch"))
def _(w, d):
    routed = copy(w.routed, d)
    data = bytearray((routed / "router.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (routed / "router.safetensors").write_bytes(bytes(data))
    return ["inspect", str(routed)]


@case("apply --verify an unsigned pack", "integrity", refused(r"pack: not signed \(no graftline.sig\)"))
def _(w, d):
    return ["apply", str(w.base), str(w.pack), "--out", str(d / "out"), "--verify", str(w.keys / "graftline.pub")]


@case("apply --verify a signed pack edited afterwards (hashes recomputed)", "integrity", refused(r"graftline.sig: does not verify"))
def _(w, d):
    pack = copy(w.pack_signed, d)
    edit_json(pack / "skillpack.json", lambda m: m.update(source={"evil": True}))
    return ["apply", str(w.base), str(pack), "--out", str(d / "out"), "--verify", str(w.keys / "graftline.pub")]


@case("apply --verify with another signer's key", "integrity", refused(r"graftline.sig: does not verify with .*other.pub"))
def _(w, d):
    return ["apply", str(w.base), str(w.pack_signed), "--out", str(d / "out"), "--verify", str(w.keys / "other.pub")]


@case("apply --verify a properly signed pack", "integrity", Expect(0, changes=("out", "out/*")))
def _(w, d):
    return ["apply", str(w.base), str(w.pack_signed), "--out", str(d / "out"), "--verify", str(w.keys / "graftline.pub")]


@case("route --verify an unsigned pack", "integrity", refused(r"pack: not signed"))
def _(w, d):
    return ["route", str(w.base), str(w.pack), "--out", str(d / "out"), "--verify", str(w.keys / "graftline.pub"),
            "--prompts", f"rev={w.data / 'rev.jsonl'}", f"none={w.data / 'general.jsonl'}"]


@case("adapter_config.json: r is text", "integrity", refused(r"adapter_config.json: r: Input should be a valid integer"))
def _(w, d):
    adapter = copy(w.adapter, d)
    edit_json(adapter / "adapter_config.json", lambda m: m.update(r="eight"), rehash_after=False)
    return ["pack", str(adapter), "--base", str(w.base), "--out", str(d / "out")]


@case("adapter_config.json: not LoRA", "integrity", refused(r"adapter_config.json: peft_type: Input should be 'LORA'"))
def _(w, d):
    adapter = copy(w.adapter, d)
    edit_json(adapter / "adapter_config.json", lambda m: m.update(peft_type="IA3"), rehash_after=False)
    return ["pack", str(adapter), "--base", str(w.base), "--out", str(d / "out")]


@case("adapter_config.json: a list", "integrity", refused(r"adapter_config.json: expected a JSON object"))
def _(w, d):
    adapter = copy(w.adapter, d)
    (adapter / "adapter_config.json").write_text("[]")
    return ["pack", str(adapter), "--base", str(w.base), "--out", str(d / "out")]


@case("adapter_config.json: DoRA", "integrity", refused(r"adapter_config.json: use_dora: Input should be False"))
def _(w, d):
    adapter = copy(w.adapter, d)
    edit_json(adapter / "adapter_config.json", lambda m: m.update(use_dora=True), rehash_after=False)
    return ["merge-adapters", str(adapter), str(w.adapter_b), "--out", str(d / "out")]


@case("checkpoint index naming a shard outside the folder", "integrity", refused(r"model.safetensors.index.json: weight_map: '\.\./"))
def _(w, d):
    base = copy(w.base, d)
    (base / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "../../outside.safetensors"}}))
    return ["apply", str(base), str(w.pack), "--out", str(d / "out")]


# --- 4. safetensors only --------------------------------------------------------------------------

PICKLE = r"pickle checkpoints are refused"


@case("apply onto a base of pickle weights", "pickle", refused(PICKLE))
def _(w, d):
    return ["apply", str(w.pickle_base), str(w.pack), "--out", str(d / "out")]


@case("score a base of pickle weights", "pickle", refused(PICKLE))
def _(w, d):
    return ["score", str(w.adapter), "--base", str(w.pickle_base), "--data", str(w.data / "rev.jsonl"), "--out", str(d / "out")]


@case("pack --calibration-data on a base of pickle weights", "pickle", refused(PICKLE))
def _(w, d):
    return ["pack", str(w.adapter), "--base", str(w.pickle_base), "--out", str(d / "out"), "--quantizer", "gptq",
            "--calibration-data", str(w.data / "rev.jsonl"), "--tokenizer", str(w.base)]


@case("score an adapter of pickle weights", "pickle", refused(PICKLE))
def _(w, d):
    return ["score", str(w.pickle_adapter), "--base", str(w.base), "--data", str(w.data / "rev.jsonl"), "--out", str(d / "out")]


@case("pack an adapter of pickle weights", "pickle", refused(PICKLE))
def _(w, d):
    return ["pack", str(w.pickle_adapter), "--base", str(w.base), "--out", str(d / "out")]


@case("validate a job whose base holds only pickle weights", "pickle", refused(r"job.yaml: base: .*pytorch_model.bin: " + PICKLE))
def _(w, d):
    return ["validate", str(job(d, f"name: j\nbase: {w.pickle_base}\nskills: [{{name: reverse}}]\n"))]


# --- 5. the job spec ------------------------------------------------------------------------------

def _spec_case(name: str, text: str, message: str, command: str = "validate") -> None:
    def prepare(w, d):
        return [command, str(job(d, text))]
    case(f"job: {name}", "spec", refused(message))(prepare)


SAFE = r"is not a safe name"
_spec_case("name '.'", "name: .\nskills: [{name: reverse}]\n", r"job.yaml: name: '\.' " + SAFE)
_spec_case("name '..'", "name: ..\nskills: [{name: reverse}]\n", r"job.yaml: name: '\.\.' " + SAFE)
_spec_case("name '../out'", "name: ../out\nskills: [{name: reverse}]\n", r"job.yaml: name: '\.\./out' " + SAFE)
_spec_case("skill 'none'", "name: j\nskills: [{name: none}]\n", r"job.yaml: skills\[0\]\.name: 'none' " + SAFE)
_spec_case("skill '..'", "name: j\nskills: [{name: '..', train: a.jsonl, eval: b.jsonl}]\n", r"job.yaml: skills\[0\]\.name: '\.\.' " + SAFE)
_spec_case("lr: .inf", "name: j\nskills: [{name: reverse}]\ntrain: {lr: .inf}\n", r"job.yaml: train\.lr: Input should be a finite number")
_spec_case("pack.energy: .nan", "name: j\nskills: [{name: reverse}]\npack: {energy: .nan}\n", r"job.yaml: pack\.energy: .*finite number")
_spec_case("steps: 1e30", "name: j\nskills: [{name: reverse}]\ntrain: {steps: 1e30}\n", r"job.yaml: train\.steps: ")
_spec_case("steps: 1.0e+30", "name: j\nskills: [{name: reverse}]\ntrain: {steps: 1.0e+30}\n", r"job.yaml: train\.steps: ")
_spec_case("duplicate keys", "name: j\nskills: [{name: reverse}]\ntrain: {lr: 0.1}\ntrain: {lr: 0.2}\n",
           r"job.yaml: line 4: not valid YAML \(found duplicate key 'train'\)")
_spec_case("duplicate nested keys", "name: j\nskills: [{name: reverse}]\ntrain: {lr: 0.1, lr: 0.2}\n", r"found duplicate key 'lr'")
_spec_case("a list at the top level", "- name: j\n", r"job.yaml: the job spec must be a mapping")
_spec_case("num_workers: 1e20, run", "name: j\noutput_dir: runs\nskills: [{name: reverse}]\ntrain: {num_workers: 100000000000000000000}\n",
           r"job.yaml: train.*num_workers 100000000000000000000 is beyond any sane setting", command="run")
_spec_case("unknown key, run", "name: j\noutput_dir: runs\nskills: [{name: reverse}]\ntrain: {stpes: 10}\n",
           r"job.yaml: train\.stpes: unknown key", command="run")
_spec_case("require_signature key file missing", "name: j\nskills: [{name: reverse}]\ngraft: {require_signature: nokey.pub}\n",
           r"job.yaml: graft\.require_signature: no such key file 'nokey.pub'")


@case("merge config with a duplicate key", "spec", refused(r"merge.yaml: not valid YAML \(line \d+\): found duplicate key 'merge_method'"))
def _(w, d):
    (d / "merge.yaml").write_text(w.merge_yaml.read_text() + "merge_method: ties\n")
    return ["merge", str(d / "merge.yaml"), str(d / "out")]


# ------------------------------------------------------------------------------------------- running

@dataclass
class Run:
    code: int
    stdout: str
    stderr: str
    traceback: bool


def run_in_process(argv: list[str], cwd: Path) -> Run:
    """`graft ARGV` in this process (fast: imports once); an exception escaping `main` counts as a traceback."""
    import contextlib
    import io

    from pipelines.cli import main

    out, err = io.StringIO(), io.StringIO()
    here = Path.cwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(argv)
            except SystemExit as e:
                code = int(e.code or 0)
            except BaseException as e:  # noqa: BLE001 - what a user would see as a traceback
                return Run(1, out.getvalue(), err.getvalue() + f"Traceback: {type(e).__name__}: {e}", True)
    finally:
        os.chdir(here)
    return Run(code, out.getvalue(), err.getvalue(), False)


def run_subprocess(argv: list[str], cwd: Path, timeout: float = 600) -> Run:
    """`graft ARGV` as its own process, exactly as a user runs it."""
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "pipelines.cli", *argv], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
    return Run(proc.returncode, proc.stdout, proc.stderr, "Traceback (most recent call last)" in proc.stderr)


def snapshot(*roots: Path) -> dict[str, str]:
    """{path: sha256 (or 'dir' / 'link')} of everything under `roots`."""
    out = {}
    for root in roots:
        for p in [root, *sorted(root.rglob("*"))]:
            if p.is_symlink():
                out[str(p)] = "link:" + os.readlink(p)
            elif p.is_dir():
                out[str(p)] = "dir"
            elif p.is_file():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


PROGRESS = re.compile(r"\d+%\|")  # a progress bar (transformers' "Loading weights"), not a message


@dataclass
class Outcome:
    case: str
    group: str
    command: str
    exit_code: int
    message: str
    verdict: str  # clean_refusal | ok | traceback | data_lost | silent_success | wrong_message | unexpected_change | failed
    detail: str = field(default="")


def verdict(c: Case, w: World, d: Path, run: Run, before: dict[str, str], after: dict[str, str], argv: list[str]) -> Outcome:
    """Judge one run of case `c` against what it expects."""
    lines = [line for line in run.stderr.splitlines()
             if line.strip() and not line.startswith("graft: note") and not PROGRESS.search(line)]
    message = lines[-1] if lines else ""
    base = dict(case=c.name, group=c.group, command="graft " + " ".join(argv), exit_code=run.code, message=message)
    lost = [p for p in before if (p not in after or after[p] != before[p]) and not _allowed(p, d, c.expect.changes)]
    new = [p for p in after if p not in before and not _allowed(p, d, c.expect.changes)]
    if run.traceback:
        return Outcome(**base, verdict="traceback", detail=run.stderr[-500:])
    if lost:
        return Outcome(**base, verdict="data_lost", detail=f"changed or removed: {lost[:3]}")
    if c.expect.code != 0 and run.code == 0:
        return Outcome(**base, verdict="silent_success", detail=run.stdout[-300:])
    if run.code != c.expect.code:
        return Outcome(**base, verdict="failed", detail=f"exit {run.code}, expected {c.expect.code}: {run.stderr[-300:]}")
    if new:
        return Outcome(**base, verdict="unexpected_change", detail=f"appeared: {new[:3]}")
    if c.expect.code != 0:
        if len(lines) != 1 or not re.search(c.expect.message, message):
            return Outcome(**base, verdict="wrong_message", detail=f"expected /{c.expect.message}/ on one line, got {lines!r}")
        return Outcome(**base, verdict="clean_refusal")
    if c.expect.check is not None:
        try:
            c.expect.check(w, d)
        except AssertionError as e:
            return Outcome(**base, verdict="failed", detail=str(e))
    return Outcome(**base, verdict="ok")


def _allowed(path: str, d: Path, globs: tuple[str, ...]) -> bool:
    try:
        rel = Path(path).relative_to(d).as_posix()
    except ValueError:
        return False
    return any(fnmatch(rel, g) or fnmatch(rel, g + "/*") for g in globs)


def run_case(c: Case, w: World, d: Path, runner: Callable[[list[str], Path], Run]) -> Outcome:
    """Prepare case `c` in the empty folder `d`, run it, and judge it (the world and `d` are snapshotted around the run)."""
    d.mkdir(parents=True, exist_ok=True)
    argv = c.prepare(w, d)
    cwd = c.cwd(w, d) if c.cwd else d
    before = snapshot(w.root, d)
    run = runner(argv, cwd)
    return verdict(c, w, d, run, before, snapshot(w.root, d), argv)


def kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
