"""A grafted checkpoint as an MLflow model: an MLflow 3 logged model, and a version of a registered model.

The graft stage's output becomes something MLflow lists under Models, versions and serves
(`mlflow.pyfunc.load_model("models:/NAME/VERSION")`, `mlflow models serve`):

- a dense graft ('additive', 'protected') in the layout `mlflow.transformers.save_model` writes for a
  text-generation pipeline: `model/` (config and safetensors), `components/tokenizer/`, an `MLmodel`
  with the `transformers` and `python_function` flavors;
- a routed graft as an MLflow "models from code" pyfunc: `pipelines/routed_pyfunc.py` opens
  `artifacts/routed/` on `artifacts/base/` with `graft.routing.RoutedModel` and generates; the `graft`
  package's source goes with it (`code/`), so no pickled object is ever needed.

The weights are never copied into a local artifact store: each file is hard-linked into the logged
model's folder (MLflow refuses to serve a symlink that leaves the artifact folder; a hard link is an
ordinary file there). Where hard links cannot be made (another filesystem) the files are copied, and
where the store is remote they are uploaded; both say so on the console.

Both the logged model and the version carry the graft's content key (`graftline.key`): registering the
same key again returns the version already there.
"""

from __future__ import annotations

import errno
import json
import os
import platform
import re
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import urlparse
from urllib.request import url2pathname

import yaml
from mlflow.entities import LoggedModel, LoggedModelOutput, LoggedModelStatus
from mlflow.exceptions import MlflowException
from mlflow.models import Model, ModelSignature
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode
from mlflow.tracking import MlflowClient
from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema
from packaging.version import Version

from graft.atomic import MARKER
from graft.checkpoint import INDEX_NAME, PICKLE_SUFFIXES, weight_files
from graft.routing import is_routed
from graft.signing import SIGNATURE
from pipelines.tracking import flatten

KEY_TAG = "graftline.key"
REGISTERED_TAG = "graftline.registered_model"  # "name/version", on the graft run and the job's run
MODEL_ID_TAG = "graftline.logged_model_id"
WEIGHTS_TAG = "graftline.weights"  # how the weights reached the logged model: hard-linked, copied or uploaded
MODEL_VERSIONS_TAG = "mlflow.modelVersions"  # what `mlflow.register_model` writes on a logged model
DEFAULT_MAX_NEW_TOKENS = 32  # a served request may ask for more with the `max_new_tokens` param
ROUTED_CODE = Path(__file__).with_name("routed_pyfunc.py")
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,199}")
NOT_LINKED = frozenset({MARKER, SIGNATURE})  # graftline's records of the output folder, not part of the model
LINK_ERRORS = frozenset({errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP})
REQUIREMENTS = ("mlflow", "torch", "transformers", "safetensors", "tokenizers")
ROUTED_REQUIREMENTS = (*REQUIREMENTS, "pydantic", "pyyaml", "numpy")  # what the shipped `graft` imports


class NotServable(ValueError):
    """A grafted folder MLflow cannot serve as it is; the message says why (the model is not registered)."""


def model_name_problem(name: str) -> str | None:
    """Why `name` cannot name a registered model (graftline's rule, stricter than MLflow's), or None."""
    if not MODEL_NAME.fullmatch(name):
        return f"{name!r} is not a model name: letters, digits, '_', '-', '.', not starting with '.', '_' or '-', at most 200"
    return None


def default_model_name(job: str) -> str:
    """The registered model a job's grafts become versions of when `tracking.model_name` is not set."""
    return f"{job}-grafted"


@dataclass(frozen=True)
class GraftedModel:
    """What gets registered: the graft stage's output folder, its content key, and what serving it needs."""

    folder: Path
    key: str
    tokenizer: Path  # the folder of the tokenizer the graft's prompts are encoded with
    base: Path  # the base checkpoint; a routed graft applies its packs to it at serving time
    trust_remote_code: bool = False  # the job's: whether the tokenizer may be opened with its own code


@dataclass(frozen=True)
class Registration:
    """A version of a registered model, and the logged model it was made from."""

    name: str
    version: str
    model_id: str
    reused: bool  # an earlier registration of the same content key

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


@dataclass
class _Layout:
    """A logged model's folder: files linked (or uploaded) from elsewhere, and small files written for it."""

    links: list[tuple[Path, str]] = field(default_factory=list)  # (source file, relative destination)
    write: Callable[[Path, Model], None] = lambda folder, model: None  # the small files, and the flavors into `model`

    def add_folder(self, source: Path, dest: str, skip: frozenset[str] = frozenset()) -> None:
        for path in sorted(source.rglob("*")):
            rel = path.relative_to(source)
            if path.is_file() and rel.parts[0] not in skip:
                if path.suffix in PICKLE_SUFFIXES:
                    raise NotServable(f"{path}: a pickle file; graftline never ships pickles")
                self.links.append((path, f"{dest}/{rel.as_posix()}"))

    def bytes(self) -> int:
        return sum(src.stat().st_size for src, _ in self.links)


def register_grafted(client: MlflowClient, experiment_id: str, grafted: GraftedModel, name: str, run_id: str,
                     params: Mapping[str, Any], log: Callable[[str], None] = print) -> Registration:
    """Register `grafted` as version of registered model `name`, logged from run `run_id` in `experiment_id`.

    A version of `name` already tagged with the graft's content key is returned as it is. Otherwise a logged
    model is created (`params` as its params), filled (hard links into a local store, uploads to a remote
    one), marked READY, recorded as an output of the run, and registered as a new version. NotServable
    (nothing created) when the folder cannot be served by MLflow; a failure while filling marks the logged
    model FAILED and is raised.
    """
    problem = model_name_problem(name)
    if problem:
        raise ValueError(problem)
    known = _version_for_key(client, name, grafted.key)
    if known is not None:
        return Registration(name, str(known.version), known.tags[MODEL_ID_TAG], reused=True)
    layout, flavor = (_routed_layout if is_routed(grafted.folder) else _dense_layout)(grafted)
    tags = {KEY_TAG: grafted.key, "graftline.grafted_checkpoint": str(grafted.folder), "graftline.flavor": flavor}
    logged = client.create_logged_model(experiment_id, name=f"grafted-{grafted.key}", source_run_id=run_id,
                                        params=flatten(params), tags=tags, model_type="graftline-grafted")
    try:
        how = _fill(client, logged, layout, run_id, log)
        client.set_logged_model_tags(logged.model_id, {WEIGHTS_TAG: how})
        client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
    except BaseException:
        client.finalize_logged_model(logged.model_id, LoggedModelStatus.FAILED)
        raise
    client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=0)])
    version = _new_version(client, name, logged, run_id, grafted.key)
    return Registration(name, str(version.version), logged.model_id, reused=False)


def _version_for_key(client: MlflowClient, name: str, key: str):
    """The READY version of `name` registered (by graftline) for content key `key`, or None."""
    found = client.search_model_versions(f"name = '{name}' and tags.`{KEY_TAG}` = '{key}'")
    ready = sorted((v for v in found if v.status == "READY" and MODEL_ID_TAG in v.tags), key=lambda v: int(v.version))
    return ready[0] if ready else None


def _new_version(client: MlflowClient, name: str, logged: LoggedModel, run_id: str, key: str):
    """A new version of `name` (created if new) from `logged`, linked both ways as `mlflow.register_model` links it.

    The version's source is the logged model's artifact location, not `models:/<id>`: a sqlite store resolves the
    latter with the process-wide tracking URI, which graftline never sets; nor does it keep a version's model id,
    so the version carries it as a tag.
    """
    try:
        client.create_registered_model(name, tags={"graftline.kind": "grafted"},
                                       description="Grafted checkpoints written by graftline's graft stage.")
    except MlflowException as e:
        if e.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
            raise
    version = client.create_model_version(name, source=logged.artifact_location, run_id=run_id, model_id=logged.model_id,
                                          tags={KEY_TAG: key, MODEL_ID_TAG: logged.model_id})
    links = json.loads(client.get_logged_model(logged.model_id).tags.get(MODEL_VERSIONS_TAG) or "[]")
    client.set_logged_model_tags(logged.model_id, {MODEL_VERSIONS_TAG: json.dumps(
        [*links, {"name": version.name, "version": version.version}])})
    return version


# ------------------------------------------------------------------------------------------ layouts

def _dense_layout(grafted: GraftedModel) -> tuple[_Layout, str]:
    """The layout `mlflow.transformers.save_model` writes for a text-generation pipeline, weights linked."""
    import transformers

    folder = grafted.folder
    config = json.loads((folder / "config.json").read_text())
    arch = (config.get("architectures") or [None])[0]
    if not arch or not hasattr(transformers, arch):
        raise NotServable(f"{folder / 'config.json'}: architecture {arch!r} is not a class of transformers; MLflow's "
                          "transformers flavor would load it as remote code (trust_remote_code=True)")
    weight_files(folder)  # a folder of pickles is refused here, by name
    tokenizer = _tokenizer(grafted)
    layout = _Layout()
    layout.add_folder(folder, "model", skip=NOT_LINKED)
    dtype = config.get("dtype") or config.get("torch_dtype")
    flavor = {"code": None, "components": ["tokenizer"], "instance_type": "TextGenerationPipeline", "model_binary": "model",
              "pipeline_model_type": arch, "source_model_name": str(folder), "task": "text-generation",
              "tokenizer_type": type(tokenizer).__name__, **({"torch_dtype": f"torch.{dtype}"} if dtype else {}),
              "transformers_version": transformers.__version__}

    def write(target: Path, model: Model) -> None:
        tokenizer.save_pretrained(str(target / "components" / "tokenizer"))
        model.add_flavor("transformers", **flavor)
        _add_pyfunc(model, target, REQUIREMENTS, loader_module="mlflow.transformers",
                    model_config={"max_new_tokens": DEFAULT_MAX_NEW_TOKENS, "do_sample": False, "return_full_text": False})

    layout.write = write
    return layout, "transformers"


def _routed_layout(grafted: GraftedModel) -> tuple[_Layout, str]:
    """A "models from code" pyfunc: `routed_pyfunc.py`, the `graft` package, the routed folder, its base, the tokenizer."""
    import graft

    layout = _Layout()
    layout.add_folder(grafted.folder, "artifacts/routed", skip=NOT_LINKED)
    base = grafted.base
    for name in ("config.json", "generation_config.json", INDEX_NAME):
        if (base / name).is_file():
            layout.links.append((base / name, f"artifacts/base/{name}"))
    layout.links += [(w, f"artifacts/base/{w.name}") for w in weight_files(base)]
    tokenizer = _tokenizer(grafted)
    package = Path(graft.__file__).parent
    artifacts = {"routed": grafted.folder, "base": base, "tokenizer": grafted.tokenizer}

    def write(target: Path, model: Model) -> None:
        tokenizer.save_pretrained(str(target / "artifacts" / "tokenizer"))
        for source in sorted(package.rglob("*.py")):
            dest = target / "code" / "graft" / source.relative_to(package)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, dest)
        shutil.copyfile(ROUTED_CODE, target / ROUTED_CODE.name)
        _add_pyfunc(model, target, ROUTED_REQUIREMENTS, loader_module="mlflow.pyfunc.loaders.code_model", code="code",
                    model_code_path=str(ROUTED_CODE), model_config={"max_new_tokens": DEFAULT_MAX_NEW_TOKENS},
                    artifacts={k: {"path": f"artifacts/{k}", "uri": str(v)} for k, v in artifacts.items()}, streamable=False)

    layout.write = write
    return layout, "python_function (models from code)"


def _tokenizer(grafted: GraftedModel):
    """The graft's tokenizer, refused (NotServable) when its class is not one of transformers': MLflow would open it
    with its own code whatever the job allowed."""
    import transformers
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(grafted.tokenizer), trust_remote_code=grafted.trust_remote_code)
    if not hasattr(transformers, type(tokenizer).__name__):
        raise NotServable(f"{grafted.tokenizer}: tokenizer class {type(tokenizer).__name__} is not one of transformers "
                          "(remote code); MLflow would load it with trust_remote_code=True")
    return tokenizer


def _add_pyfunc(model: Model, target: Path, packages: tuple[str, ...], **flavor: Any) -> None:
    """The python_function flavor and the environment files MLflow builds a serving environment from."""
    import mlflow.pyfunc

    pins = [f"{p}=={Version(metadata.version(p)).public}" for p in packages]
    (target / "requirements.txt").write_text("\n".join(pins) + "\n")
    python = platform.python_version()
    (target / "python_env.yaml").write_text(yaml.safe_dump(
        {"python": python, "build_dependencies": ["pip", "setuptools", "wheel"], "dependencies": ["-r requirements.txt"]},
        sort_keys=False))
    (target / "conda.yaml").write_text(yaml.safe_dump(
        {"channels": ["conda-forge"], "dependencies": [f"python={python}", "pip", {"pip": pins}], "name": "mlflow-env"},
        sort_keys=False))
    mlflow.pyfunc.add_to_model(model, conda_env="conda.yaml", python_env="python_env.yaml", **flavor)


# ------------------------------------------------------------------------------------------ filling

def local_artifact_folder(uri: str) -> Path | None:
    """The local folder an artifact location names (a plain path or a file: URI), or None for a remote store."""
    parsed = urlparse(uri)
    if parsed.scheme == "file" and parsed.netloc in ("", "localhost"):
        return Path(url2pathname(parsed.path))
    if parsed.scheme == "":
        return Path(uri)
    return None


def _fill(client: MlflowClient, logged: LoggedModel, layout: _Layout, run_id: str, log: Callable[[str], None]) -> str:
    """Put the layout into the logged model's artifact location; returns how the weights got there."""
    folder = local_artifact_folder(logged.artifact_location)
    total = layout.bytes()
    size = _size(total)
    if folder is None:
        log(f"  graft: the artifact store {logged.artifact_location} is remote: uploading the model ({size})")
        with tempfile.TemporaryDirectory() as tmp:
            _write_small(layout, Path(tmp), logged, run_id, total)
            client.log_model_artifacts(logged.model_id, tmp)
        for source, dest in layout.links:
            parent = dest.rpartition("/")[0]
            client.log_model_artifact(logged.model_id, str(source), parent or None)
        return "uploaded"
    folder.mkdir(parents=True, exist_ok=True)
    if any(folder.iterdir()):
        raise RuntimeError(f"{folder}: the new logged model's artifact folder is not empty; it is never written over")
    _write_small(layout, folder, logged, run_id, total)
    how = "hard-linked"
    for source, dest in layout.links:
        target = folder / dest
        target.parent.mkdir(parents=True, exist_ok=True)
        if how == "hard-linked":
            try:
                os.link(source, target)
                continue
            except OSError as e:
                if e.errno not in LINK_ERRORS:
                    raise
                how = f"copied ({os.strerror(e.errno)})"
                log(f"  graft: cannot hard-link {source} into {folder} ({os.strerror(e.errno)}): copying the model "
                    f"({size}) instead")
        shutil.copy2(source, target)
    return how


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def _write_small(layout: _Layout, folder: Path, logged: LoggedModel, run_id: str, total_bytes: int) -> None:
    """The generated files: MLmodel (text in, text out; `max_new_tokens` may be set per request), environment,
    tokenizer, code."""
    signature = ModelSignature(Schema([ColSpec(DataType.string)]), Schema([ColSpec(DataType.string)]),
                               ParamSchema([ParamSpec("max_new_tokens", DataType.long, DEFAULT_MAX_NEW_TOKENS)]))
    model = Model(artifact_path=logged.artifact_location, run_id=run_id, model_uuid=logged.model_id, model_id=logged.model_id,
                  signature=signature, model_size_bytes=total_bytes)
    layout.write(folder, model)
    model.save(str(folder / "MLmodel"))
