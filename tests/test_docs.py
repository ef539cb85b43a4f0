"""The documentation stays true to the code: every recipe loads through the project's config
loader, the main job's recipe is exactly the run config's defaults, every relative link in the
README and docs/ resolves, and the README stays a front page."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from alum_ds.config import RunConfig, load_config

ROOT = Path(__file__).resolve().parent.parent
RECIPES = sorted((ROOT / "recipes").glob("*.toml"))
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "bench" / "results" / "README.md"]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", flags=re.M | re.S)


def test_recipes_exist() -> None:
    names = {p.name for p in RECIPES}
    assert {"main_job.toml", "base_gpu.toml", "large_gpu.toml", "continual_alum.toml",
            "experiment.toml"} <= names, names


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipe_loads(recipe: Path) -> None:
    cfg = load_config(str(recipe))
    assert isinstance(cfg, RunConfig)


def test_main_job_recipe_is_the_defaults() -> None:
    # The main job runs without --config; its recipe file must say exactly what it runs.
    assert load_config(str(ROOT / "recipes" / "main_job.toml")) == RunConfig()


def test_recipes_say_what_they_claim() -> None:
    base = load_config(str(ROOT / "recipes" / "base_gpu.toml"))
    large = load_config(str(ROOT / "recipes" / "large_gpu.toml"))
    assert (base.model.preset, base.data.seq_len, base.schedule.global_batch_size) == ("base", 512, 8192)
    assert (large.model.preset, large.data.seq_len, large.schedule.global_batch_size) == ("large", 512, 8192)
    assert load_config(str(ROOT / "recipes" / "continual_alum.toml")).model.pretrained == "roberta-base"
    exp = load_config(str(ROOT / "recipes" / "experiment.toml"))
    assert (exp.schedule.steps, exp.alum.start_for(exp.schedule.steps)) == (1500, 1350)


def _slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = FENCE.sub("", page.read_text())
    return {_slug(m) for m in re.findall(r"^#+\s+(.+?)\s*$", text, flags=re.M)}


def _links(page: Path) -> list[str]:
    return LINK.findall(FENCE.sub("", page.read_text()))


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path) -> None:
    broken = []
    for target in _links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(target)
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(target)
    assert not broken, f"{page.relative_to(ROOT)}: links that do not resolve: {broken}"


def test_readme_is_a_front_page() -> None:
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 200, len(lines)
