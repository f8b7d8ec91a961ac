"""The HTTP API and the web page: ``create_app(models)`` loads every node model once and serves them.

Routes: ``POST /v1/predict`` (many files), ``POST /v1/explain`` (one file, Grad-CAM per stage),
``GET /v1/model`` (the tree, per-node val accuracy, batching counters), ``GET /healthz``, FastAPI's
``/docs``, and ``GET /`` (the page in ``static/``). Predictions are the objects of
``lcpn predict --format json`` (``Prediction.to_dict``), one per file, in order. An ``lcpn export``
folder is served with ``runtime="onnx"``: the same answers from onnxruntime, without explanations
(Grad-CAM needs the PyTorch networks' gradients), so ``/v1/explain`` answers 501 there.

All network work runs on one model thread: the batcher's batches and the explanations take turns,
so Grad-CAM's hooks never see another request's pass and the CPU cores are not oversubscribed.
Uploads are decoded in the event loop's thread pool meanwhile.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated, Literal

from fastapi import FastAPI, File, Query, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from PIL import Image
from starlette.exceptions import HTTPException

from .. import __version__, artefacts
from ..cascade import DECODERS, Cascade, Prediction, open_cascade
from ..explain import Explainer, Stage, heatmap_png
from ..export import MANIFEST
from ..feed import open_source
from ..hierarchy import ROOT, names_of
from ..images import ImageError
from ..models import AS_TRAINED, ConstantNode
from ..recipe import versions
from .batcher import Batcher, Settings
from .limits import BearerToken, Limits, status_of, too_many_files_handler

STATIC = Path(__file__).parent / "static"
MAX_TOP_K = 100
# The query options of predict and explain, as `lcpn predict` has them.
TopK = Annotated[int, Query(ge=0, le=MAX_TOP_K, description="Also list the K most probable full paths (0: none).")]
MinConfidence = Annotated[
    float,
    Query(
        ge=0,
        le=1,
        description="Stop descending where the chosen child's "
        "probability is below this; the top-level decision is always given.",
    ),
]
Decode = Annotated[
    Literal[DECODERS],
    Query(description="best-path: the most probable full path; greedy: the most probable child at each level."),
]


def create_app(
    models: str | Path,
    *,
    device: str = "auto",
    precision: str = AS_TRAINED,
    runtime: str = "torch",
    max_batch: int = 64,
    max_wait_ms: float = 10.0,
    limits: Limits | None = None,
    token: str | None = None,
) -> FastAPI:
    """The app for a model folder; every node is loaded and run once here, so a folder that cannot
    serve raises (``ArtefactError``) before any request is taken."""
    models, limits = Path(models), limits or Limits()
    cascade = open_cascade(models, runtime, device, precision)
    cascade.predict_batch([Image.new("RGB", (64, 64), "white")])  # every node runs once: no slow first request
    explainer = Explainer(cascade, models) if runtime == "torch" else None
    model_thread = ThreadPoolExecutor(1, thread_name_prefix="lcpn-model")
    batcher = Batcher(cascade, model_thread, max_batch, max_wait_ms)
    description = describe_models(models, cascade) | {"runtime": runtime, "explanations": explainer is not None}

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        yield
        await batcher.stop()
        model_thread.shutdown(wait=True)

    app = FastAPI(
        title="lcpn", version=__version__, lifespan=lifespan,
        description="Hierarchical image classification (one classifier per parent node), with Grad-CAM per stage.",
        max_body_size=limits.max_body_bytes, form_limits={"max_files": limits.max_files},
    )  # fmt: skip
    app.add_exception_handler(HTTPException, too_many_files_handler(limits))
    if token:
        app.add_middleware(BearerToken, token=token)
    app.state.batcher = batcher

    @app.post("/v1/predict")
    async def predict(
        files: Annotated[list[UploadFile], File(description="One or more images.")],
        top_k: TopK = 1,
        min_confidence: MinConfidence = 0.0,
        decode: Decode = "best-path",
    ) -> JSONResponse:
        """The class of every image at every level, as `lcpn predict --format json` gives it.

        200 when every file was predicted; otherwise 413 when a file was too large (bytes or pixels),
        else 422, and ``errors`` names each failed file and why: the other files are answered all the same.
        """
        names = [upload_name(f, i) for i, f in enumerate(files)]
        opened = await asyncio.gather(*(_open(limits, f) for f in files))
        good = [o for o in opened if not isinstance(o, ImageError)]
        answers = iter(await batcher.predict(good, Settings(top_k, decode, min_confidence)))
        predictions, errors = [], []
        for i, (name, o) in enumerate(zip(names, opened)):
            if isinstance(o, ImageError):
                errors.append({"index": i, "file": name, "status": status_of(o), "error": str(o)})
            prediction = Prediction(image="", error=str(o)) if isinstance(o, ImageError) else next(answers)
            prediction.image = name
            predictions.append(prediction.to_dict())
        body = {"predictions": predictions, "errors": errors}
        if not errors:
            return JSONResponse(body)
        failed = "; ".join(f"{e['file']}: {e['error']}" for e in errors)
        body["detail"] = f"{len(errors)} of {len(files)} file(s) could not be predicted ({failed})"
        return JSONResponse(body, status_code=413 if any(e["status"] == 413 for e in errors) else 422)

    @app.post("/v1/explain")
    async def explain(
        file: Annotated[UploadFile, File(description="One image.")],
        top_k: TopK = 1,
        min_confidence: MinConfidence = 0.0,
        decode: Decode = "best-path",
    ) -> JSONResponse:
        """The prediction and, for every stage of its path, a Grad-CAM heatmap of the chosen class.

        Each stage has the deciding node, the class, its probability and ``heatmap_png``: the heatmap
        (JET colours, the image's own size) as base64 PNG; null for a constant node, with a note.
        """
        if explainer is None:
            detail = (f"explanations need the trained PyTorch models; this server runs the {runtime} export "
                      f"'{models.name}': serve the `lcpn train` folder for heatmaps")  # fmt: skip
            return JSONResponse({"detail": detail}, 501)
        name = upload_name(file, 0)
        image = await _open(limits, file)
        if isinstance(image, ImageError):
            return JSONResponse({"detail": f"{name}: {image}", "file": name, "error": str(image)}, status_of(image))
        loop = asyncio.get_running_loop()
        explanation = await loop.run_in_executor(model_thread, explainer.explain, image, top_k, decode, min_confidence)
        explanation.prediction.image = name
        stages = await run_in_threadpool(lambda: [stage_record(s) for s in explanation.stages])
        return JSONResponse({"prediction": explanation.prediction.to_dict(), "width": image.width,
                             "height": image.height, "stages": stages})  # fmt: skip

    @app.get("/v1/model")
    async def model() -> dict:
        """The class tree with each node's val accuracy and class counts, the models' settings and versions."""
        batching = {"max_batch": max_batch, "max_wait_ms": max_wait_ms, **batcher.stats.to_dict()}
        limit_info = {"max_files": limits.max_files, "max_file_mb": limits.max_file_mb}
        return {**description, "batching": batching, "limits": limit_info}

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def upload_name(upload: UploadFile, index: int) -> str:
    """How an upload is named in answers: its file name, or its position when it has none."""
    return upload.filename or f"<file #{index + 1}>"


async def _open(limits: Limits, upload: UploadFile) -> Image.Image | ImageError:
    data = await limits.read(upload)
    return data if isinstance(data, ImageError) else await run_in_threadpool(open_source, data)


def stage_record(stage: Stage) -> dict:
    heatmap = None if stage.heatmap is None else base64.b64encode(heatmap_png(stage.heatmap)).decode("ascii")
    return {"node": stage.node or "root", "class": stage.chosen, "probability": round(stage.probability, 6),
            "heatmap_png": heatmap, "note": stage.note}  # fmt: skip


def describe_models(models: Path, cascade: Cascade) -> dict:
    """The tree as nested nodes (val accuracy and per-class val counts on parents), the training
    mode, backbone and image size, the attributes and their values, and the versions the models
    were trained and are served with. An export folder has no per-node reports: its nodes carry no val figures."""
    tree = cascade.tree
    manifest = models / MANIFEST
    infos = {} if manifest.is_file() else {n: artefacts.read_info(models / tree.folders[n]) for n in tree.parents}
    trained = [info for info in infos.values() if info.kind != "constant"]

    def describe(node: str) -> dict:
        entry = {"id": node, "name": names_of(node)[-1] if node else "root", "leaf": tree.is_leaf(node)}
        if not entry["leaf"]:
            info = infos.get(node)
            metrics = info.metrics if info else {}
            on_val = bool(metrics.get("n")) and str(metrics.get("evaluated_on", "val")).startswith("val")
            per_class = metrics.get("per_class", {})
            model = cascade.nodes[node]
            entry.update({
                "kind": "constant" if isinstance(model, ConstantNode) else (info.mode if info else "onnx"),
                "val_accuracy": metrics.get("accuracy") if on_val else None, "val_images": metrics.get("n", 0),
                "class_counts": {c: int(per_class[c]["support"]) for c in model.classes if c in per_class},
                "children": [describe(child) for child in tree.children[node]],
            })  # fmt: skip
        return entry

    def one(values: set) -> str | int | None:
        return values.pop() if len(values) == 1 else ("mixed" if values else None)

    if infos:
        settings = {"mode": one({info.mode for info in trained}), "backbone": one({info.backbone for info in trained}),
                    "image_size": one({artefacts.data_config(info).image_size for info in trained}),
                    "trained_with": trained[0].versions if trained else {}}  # fmt: skip
    else:  # the export's manifest and its copy of the models' hierarchy.json
        exported = json.loads(manifest.read_text(encoding="utf-8"))
        index = json.loads((models / "hierarchy.json").read_text(encoding="utf-8"))
        settings = {"mode": index.get("config", {}).get("mode"), "backbone": index.get("config", {}).get("backbone"),
                    "image_size": one({m["data"]["image_size"] for m in exported["models"].values()}),
                    "trained_with": index.get("versions", {})}  # fmt: skip
    return {
        "tree": describe(ROOT), "depth": tree.max_depth, "parents": len(tree.parents), "leaves": len(tree.leaves),
        "mode": settings["mode"], "backbone": settings["backbone"], "image_size": settings["image_size"],
        "attributes": [{"name": name, "values": list(a.spec.values)} for name, a in cascade.attributes.items()],
        "versions": {"trained_with": settings["trained_with"], "serving": versions()},
    }  # fmt: skip
