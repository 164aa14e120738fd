"""The console's pages: GET routes that render `free_server.console.views` with jinja2.

Pages are plain server-rendered HTML (no script); the meta-val curve is an inline SVG
drawn here. Every route is a GET: the console has nothing to post.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import HTMLResponse, Response
from fastapi.templating import Jinja2Templates
from PIL import Image

from free_common.engine.recovered import image_grid, read_recovered
from free_common.errors import CanonicalFormError, RecordNotFound
from free_server.console.views import ConsoleData
from free_server.rounds import ENGINE_DIR

__all__ = ["curve_svg", "router"]

_TEMPLATES = Jinja2Templates(directory=str(Path(__file__).parent / "templates"))
_IMAGES_PER_CLASS = 8
_TILE_SCALE = 3

router = APIRouter()


def _data(request: Request) -> ConsoleData:
    data: ConsoleData = request.app.state.data
    return data


def _page(request: Request, name: str, **context: Any) -> HTMLResponse:
    context["show_recovered"] = _data(request).home.config.console.show_recovered
    return _TEMPLATES.TemplateResponse(request, name, context)


def curve_svg(
    points: list[tuple[int, float, float]], steps: int, width: int = 480, height: int = 160
) -> str:
    """Draw an SVG line of (step, accuracy, ci95) points: steps 0 to `steps`, accuracy 0-100%."""
    if not points:
        return ""
    last = max(steps, *(step for step, _, _ in points), 1)
    pad = 28

    def xy(step: int, value: float) -> tuple[float, float]:
        x = pad + (width - 2 * pad) * step / last
        return x, height - pad - (height - 2 * pad) * max(0.0, min(1.0, value))

    line = " ".join(f"{x:.1f},{y:.1f}" for x, y in (xy(s, m) for s, m, _ in points))
    dots = "".join(
        f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3"><title>step {s}: {m:.1%} ± {c:.1%}</title>'
        "</circle>"
        for s, m, c in points
        for x, y in (xy(s, m),)
    )
    axes = (
        f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}"/>'
        f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{height - pad}"/>'
        f'<text x="2" y="{pad + 4}">100%</text><text x="8" y="{height - pad + 4}">0%</text>'
        f'<text x="{width - pad}" y="{height - 6}" text-anchor="end">step {last}</text>'
    )
    return (
        f'<svg class="curve" viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="meta-val accuracy by step">{axes}<polyline points="{line}"/>{dots}</svg>'
    )


@router.get("/", response_class=HTMLResponse)
def overview(request: Request) -> HTMLResponse:
    """Owners, submissions by state, rounds, releases, the running round, health."""
    return _page(request, "overview.html", page="overview", o=_data(request).overview())


@router.get("/owners", response_class=HTMLResponse)
def owners(request: Request) -> HTMLResponse:
    """Every owner: its keys and their states, its submissions by state."""
    return _page(request, "owners.html", page="owners", owners=_data(request).owners())


@router.get("/submissions", response_class=HTMLResponse)
def submissions(request: Request, state: str | None = None) -> HTMLResponse:
    """Every submission, newest first: owner, size, times, verdict and reason."""
    report = _data(request).report()
    rows = list(reversed(report["submissions"]["recent"]))
    if state is not None:
        rows = [s for s in rows if _shown_state(s) == state]
    return _page(
        request,
        "submissions.html",
        page="submissions",
        rows=rows,
        counts=report["submissions"],
        state=state,
    )


@router.get("/rounds", response_class=HTMLResponse)
def rounds(request: Request) -> HTMLResponse:
    """Every round, newest first, with its state, live step and time."""
    return _page(request, "rounds.html", page="rounds", rounds=_data(request).rounds())


@router.get("/rounds/{round_id}", response_class=HTMLResponse)
def round_page(request: Request, round_id: int) -> HTMLResponse:
    """One round: progress, meta-val curve, recovery, teacher accuracy, models used."""
    data = _data(request)
    try:
        entry = data.round(round_id)
    except RecordNotFound as exc:
        raise HTTPException(404, exc.message) from None
    progress = entry["progress"]
    recovered = None
    if entry["holds_bank"] and data.home.config.console.show_recovered:
        recovered = read_recovered(data.home.root / ENGINE_DIR, _IMAGES_PER_CLASS)
    steps = []
    if progress is not None:
        accuracy = dict(progress.teacher_accuracy)
        steps = [(s, sec, accuracy.get(s)) for s, sec in progress.recovery_seconds[-20:]]
    return _page(
        request,
        "round.html",
        page="rounds",
        r=entry,
        curve=curve_svg(progress.curve, progress.steps) if progress else "",
        steps=steps,
        recovered=recovered,
    )


@router.get("/rounds/{round_id}/recovered/{teacher}.png")
def recovered_grid(request: Request, round_id: int, teacher: str) -> Response:
    """One teacher's recovered images (rows: its classes), when ``show_recovered`` is on."""
    data = _data(request)
    if not data.home.config.console.show_recovered:
        raise HTTPException(404, "recovered images are off: [console] show_recovered = false")
    if data.bank_round() != round_id:
        raise HTTPException(404, "the engine keeps the recovered images of its latest round only")
    recovered = read_recovered(data.home.root / ENGINE_DIR, _IMAGES_PER_CLASS)
    classes = None if recovered is None else recovered.by_teacher.get(teacher)
    if classes is None:
        raise HTTPException(404, f"no recovered images of model {teacher}")
    grid = image_grid([images for _key, images in classes])
    array = (grid.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
    picture = Image.fromarray(array, "RGB")
    picture = picture.resize(
        (picture.width * _TILE_SCALE, picture.height * _TILE_SCALE), Image.Resampling.NEAREST
    )
    out = io.BytesIO()
    picture.save(out, format="PNG")
    return Response(out.getvalue(), media_type="image/png")


@router.get("/releases", response_class=HTMLResponse)
def releases(request: Request) -> HTMLResponse:
    """Every release, newest first: lineage, metrics and their change, manifest link."""
    return _page(request, "releases.html", page="releases", releases=_data(request).releases())


@router.get("/releases/{version}/manifest.json")
def manifest(request: Request, version: int) -> Response:
    """Release `version`'s signed manifest, as ``manifest.json`` on an owner's disk."""
    try:
        body = _data(request).manifest_document(version)
    except RecordNotFound as exc:
        raise HTTPException(404, exc.message) from None
    except CanonicalFormError as exc:
        raise HTTPException(500, f"the stored manifest is damaged: {exc.message}") from None
    disposition = f'attachment; filename="release-{version}-manifest.json"'
    return Response(
        body, media_type="application/json", headers={"content-disposition": disposition}
    )


def _shown_state(row: dict[str, Any]) -> str:
    """Return what the submissions page files a row under, as `status` counts it."""
    if row["withdrawn_at"]:
        return "withdrawn"
    return "held" if row["held_at"] else str(row["state"])
