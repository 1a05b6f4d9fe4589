"""``/v1/predict``: an image in (raw bytes or multipart), the manifest's pre-processing, the bundle's
task's answer out (top-k labels for a classifier, boxes in the image's pixels for a detector).

Decoding is the one step whose memory grows with the request, so it is bounded before it
starts: the image header is read first (size, format) and an image over the pixel budget is
refused without being decoded; decodes run off the event loop, a few at a time.
"""

from __future__ import annotations

import io
from functools import partial
from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from edgerun.errors import PayloadTooLargeError, RequestError, UnsupportedMediaTypeError
from edgerun.loader import ServedModel
from edgerun.preprocess import preprocess_image_with_transform
from edgerun.routes.deps import RequestTimer, ServerState, accepts, error_responses, server_state, timed
from edgerun.tasks.base import ImageResult, ImageTask, PredictOptions
from edgerun.tasks.classification import ClassificationResponse
from edgerun.tasks.detection import DetectionResponse
from edgerun.tasks.registry import image_task

router = APIRouter()

# Pixel budget per image: 16x the model's input, at least 16 Mpx (a 12 Mpx phone photo passes) and
# at most 20 Mpx, so two decodes at a time (RGBA + its RGB copy) stay near 300 MB.
MIN_IMAGE_PIXELS = 16_000_000
MAX_IMAGE_PIXELS = 20_000_000
PIXELS_PER_INPUT_PIXEL = 16
# Formats Pillow decodes by running another program on the bytes (EPS: Ghostscript, a PostScript
# interpreter): a request body is never handed to one.
EXTERNAL_DECODERS = frozenset({"EPS"})
# Without a recorded resize policy, an image whose aspect ratio is further than this from the
# model's is refused rather than squashed.
MAX_ASPECT_DISTORTION = 4.0
# Bounds of the per-request detection overrides.
MAX_DETECTIONS = 1000
# The answers, one per task with an image answer (the OpenAPI document lists each).
PredictAnswer = ClassificationResponse | DetectionResponse

PREDICT_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "image/*": {"schema": {"type": "string", "format": "binary"}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            "multipart/form-data": {
                "schema": {"type": "object", "properties": {"file": {"type": "string", "format": "binary"}}}
            },
        },
    }
}


def pixel_budget(spec: dict[str, Any]) -> int:
    size = spec.get("size")
    model_pixels = int(size[0]) * int(size[1]) if isinstance(size, (list, tuple)) and len(size) == 2 else 0
    return min(MAX_IMAGE_PIXELS, max(MIN_IMAGE_PIXELS, PIXELS_PER_INPUT_PIXEL * model_pixels))


def image_size(data: bytes) -> tuple[int, int]:
    """Width and height from the image header only (nothing is decoded)."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise RequestError("empty image; send the image bytes as the body or as a multipart file field")
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.format in EXTERNAL_DECODERS:
                raise UnsupportedMediaTypeError(
                    f"{image.format} images are not decoded here (that would run an external interpreter on "
                    f"the request); send PNG, JPEG, BMP or another raster format"
                )
            return image.size
    except Image.DecompressionBombError:
        raise PayloadTooLargeError("image header declares far more pixels than any model takes; refusing it") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise RequestError(
            f"body ({len(data)} bytes) is not a readable image; send PNG, JPEG, BMP or "
            f"another format Pillow reads, as the body or as a multipart file field"
        ) from None


def check_image(width: int, height: int, spec: dict[str, Any], model: str) -> None:
    budget = pixel_budget(spec)
    if width * height > budget:
        raise PayloadTooLargeError(
            f"image is {width}x{height} ({width * height / 1e6:.1f} Mpx), over the {budget / 1e6:.0f} Mpx "
            f"this server decodes for model '{model}'; downscale it first"
        )
    size = spec.get("size")
    if spec.get("resize") in ("center-crop", "letterbox"):
        return  # the recorded resize policy fits any aspect ratio without distorting it
    if not (isinstance(size, (list, tuple)) and len(size) == 2) or not width * height:
        return
    model_h, model_w = int(size[0]), int(size[1])
    distortion = (width / height) / (model_w / model_h)
    distortion = max(distortion, 1 / distortion)
    if distortion > MAX_ASPECT_DISTORTION:
        raise RequestError(
            f"image is {width}x{height} but model '{model}' takes {model_w}x{model_h}: the aspect ratio is "
            f"{distortion:.1f}x off (more than {MAX_ASPECT_DISTORTION:g}x) and the bundle's preprocess.resize is "
            f"'stretch'; crop or pad the image to about {model_w}:{model_h} first, or pack with a center-crop "
            f"or letterbox resize"
        )


async def _image_bytes(request: Request) -> bytes:
    if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
        return await request.body()
    try:
        async with request.form(max_files=1, max_fields=8) as form:
            uploads = [v for v in form.values() if hasattr(v, "read")]
            if not uploads:
                raise RequestError("multipart body has no file part; upload the image as a file field")
            return await uploads[0].read()
    except HTTPException as exc:  # the multipart parser's own errors
        raise RequestError(
            f"multipart body cannot be parsed ({exc.detail}); upload the image as a file field"
        ) from None


def _choose(state: ServerState, model: str | None) -> ServedModel:
    if model is None and len(state.repo.models) > 1:
        raise RequestError(
            f"several models are served ({', '.join(sorted(state.repo.models))}); name one with ?model=NAME"
        )
    return state.lookup(model)


def _options(conf: float | None, iou: float | None, max_det: int | None, task: ImageTask, model: str) -> PredictOptions:
    options = PredictOptions(conf=conf, iou=iou, max_det=max_det)
    unused = [name for name in options.given() if name not in task.options]
    if unused:
        verb = "applies" if len(unused) == 1 else "apply"
        raise RequestError(
            f"{', '.join(unused)} {verb} only to detection models; model '{model}' is a {task.name} model"
        )
    return options


@router.post(
    "/v1/predict",
    response_model=PredictAnswer,
    tags=["inference"],
    responses=error_responses(400, 401, 404, 408, 413, 415, 503, 504),
    openapi_extra=PREDICT_BODY,
    dependencies=[Depends(accepts("image/*", "application/octet-stream", "multipart/form-data", missing_ok=True))],
)
async def predict(
    request: Request,
    model: str | None = None,
    conf: float | None = Query(None, gt=0, le=1, description="detection: keep boxes scoring at least this"),
    iou: float | None = Query(None, gt=0, le=1, description="detection: NMS overlap above which a box is dropped"),
    max_det: int | None = Query(None, ge=1, le=MAX_DETECTIONS, description="detection: at most this many boxes"),
    state: ServerState = Depends(server_state),
    timer: RequestTimer = Depends(timed("predict")),
) -> PredictAnswer:
    """Raw image bytes (or a multipart upload) in, the bundle's task's answer out: top-k classes for a
    classifier, boxes in the image's own pixels for a detector (``conf``/``iou``/``max_det`` override the
    manifest's). Tensor and embedding models answer 400: their outputs come from the v2 infer route."""
    served = _choose(state, model)
    timer.label = served.name
    spec = served.manifest.preprocess
    if not spec:
        raise RequestError(
            f"model '{served.name}' has no 'preprocess' in its manifest; send tensors to "
            f"/v2/models/{served.name}/infer instead"
        )
    task = image_task(served.manifest)
    options = _options(conf, iou, max_det, task, served.name)
    if len(served.session.inputs) != 1:
        raise RequestError(
            f"/v1/predict feeds one image but model '{served.name}' has inputs "
            f"{[s.name for s in served.session.inputs]}; use the v2 infer endpoint"
        )
    data = await _image_bytes(request)
    width, height = image_size(data)
    check_image(width, height, spec, served.name)
    async with state.image_slots:
        # The header was checked against the budget already; the decoder enforces it on what it decodes.
        array, transform = await run_in_threadpool(
            partial(preprocess_image_with_transform, data, spec, max_pixels=pixel_budget(spec))
        )
    input_name = spec.get("input", served.session.inputs[0].name)
    outputs = await state.dataplane.run(served, {input_name: array})
    result = ImageResult(served.name, served.manifest, served.labels, outputs, transform, options)
    answer = await run_in_threadpool(task.answer, result) if task.offload else task.answer(result)
    return answer  # type: ignore[return-value]  # the task's own response model, one of PredictAnswer
