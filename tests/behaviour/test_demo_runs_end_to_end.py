"""The one-command demo: every stage runs, the report holds every figure and renders in a browser."""

import json
import re
import shutil
import subprocess

import pytest

pytestmark = pytest.mark.slow

SECTIONS = ["Emergent misalignment", "SAEs", "Locating the feature", "Steering and clamping", "Re-alignment",
            "across the EM fine-tune"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from misfeat.cli import main

    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--out", str(out)]) == 0
    return out


def test_summary_has_the_key_numbers(demo):
    s = json.loads((demo / "summary.json").read_text())
    assert s["organism"]["em"]["heldout"]["misaligned_rate"] >= 0.4
    assert s["feature_passed_screen"] and s["feature_auroc_docs"] >= 0.95
    assert s["clamp"]["misaligned_after"] <= 0.2 * s["clamp"]["misaligned_before"]
    assert s["realign"]["misaligned_rate"][-1] <= 0.05
    assert all(m["explained_variance"] >= 0.9 for m in s["sae"].values())
    assert set(s["timings_s"]) == {"organism", "cache", "sae", "locate", "steer", "realign", "trajectory"}


def test_report_embeds_every_stage(demo):
    html = (demo / "report.html").read_text()
    for title in SECTIONS:
        assert title in html, title
    assert len(re.findall(r"src='data:image/png;base64,", html)) == 7  # em curve, ranking, screen, steer, ablation, realign, trajectory
    assert "missing figure" not in html


def _chromium():
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(_chromium() is None, reason="no Chromium here (make test installs Debian's chromium)")
def test_report_renders_in_headless_chromium(demo, tmp_path):
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}"]
    url = (demo / "report.html").as_uri()
    dom = subprocess.run([_chromium(), *flags, "--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    for title in SECTIONS:
        assert title in dom.stdout, title
    shot = tmp_path / "report.png"
    subprocess.run([_chromium(), *flags, "--window-size=1200,3000", f"--screenshot={shot}", url],
                   capture_output=True, timeout=120, check=True)
    from PIL import Image

    image = Image.open(shot).convert("L")
    assert image.size == (1200, 3000)
    # rendered figures: many distinct grey levels, not a blank page
    assert len(set(image.getdata())) > 50
