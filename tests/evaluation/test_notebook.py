import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[2] / "notebooks" / "compare_policies.ipynb"


def test_notebook_reproduces_the_main_plot_from_a_pipeline_run(tiny_pipeline, monkeypatch):
    monkeypatch.setenv("EENN_PIPELINE_DIR", str(tiny_pipeline))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(
        nb, timeout=240, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}
    ).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs)  # the plot was drawn
    assert any("runs; policies:" in o.get("text", "") for o in outputs)


#: headless Chromium with its own background traffic off and every host name unresolvable: nothing
#: leaves the machine, and a request a page makes still shows in the network log (and fails)
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-default-apps",
    "--disable-domain-reliability",
    "--no-pings",
    "--disable-features=NetworkTimeServiceQuerying,OptimizationGuideModelDownloading,OptimizationHints,MediaRouter",
    "--host-resolver-rules=MAP * ~NOTFOUND",
]


def _chromium(chromium: str, profile: Path, page: Path, *args: str) -> str:
    import subprocess

    done = subprocess.run(
        [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args, page.as_uri()],
        check=True,
        capture_output=True,
        text=True,
        timeout=180,
    )
    return done.stdout


def page_requests(net_log: Path) -> list[str]:
    """The URLs a page asked for, from Chromium's network log (the browser's own requests carry no
    origin; a page's carry its origin, "null" for a file)."""
    import json

    log = json.loads(net_log.read_text())
    start = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    return [
        e["params"]["url"]
        for e in log["events"]
        if e["type"] == start and "url" in e.get("params", {}) and e["params"].get("initiator") != "not an origin"
    ]


@pytest.mark.browser
def test_report_renders_in_headless_chromium(tiny_pipeline, tmp_path):
    import shutil

    from PIL import Image

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        message = "chromium is not installed (Debian: apt-get install chromium)"
        if os.environ.get("EENN_REQUIRE_CHROMIUM"):  # CI (make test-browser): a skip would hide that it never ran
            pytest.fail(message)
        pytest.skip(message)
    report = tiny_pipeline / "compare" / "report.html"
    # the page after its scripts ran: the interactive figure drew its curves, and asked for nothing
    net_log = tmp_path / "net.json"
    dom = _chromium(
        chromium, tmp_path / "profile", report, f"--log-net-log={net_log}", "--virtual-time-budget=10000", "--dump-dom"
    )
    figure = dom.split('id="accuracy-vs-cost-flops"', 1)[1]
    assert 'class="main-svg"' in figure and figure.count('class="trace scatter') >= 3  # policies, exits, oracle
    assert page_requests(net_log) == []
    # the log would show one: a page that asks for a file elsewhere
    canary = tmp_path / "canary.html"
    canary.write_text('<img src="http://example.invalid/x.png">')
    _chromium(chromium, tmp_path / "profile2", canary, f"--log-net-log={tmp_path / 'canary.json'}", "--dump-dom")
    assert page_requests(tmp_path / "canary.json") == ["http://example.invalid/x.png"]

    shot = tmp_path / "report.png"
    _chromium(
        chromium,
        tmp_path / "profile3",
        report,
        "--window-size=1400,2400",
        "--virtual-time-budget=10000",
        f"--screenshot={shot}",
    )
    img = Image.open(shot).convert("L")
    lo, hi = img.getextrema()
    assert hi - lo > 100  # not blank: text and plots drawn
    rgb = Image.open(shot).convert("RGB")
    colours = len(set(rgb.resize((200, 340)).getdata()))
    assert colours > 50  # the plots' colours, not just black text on white
    # the interactive figure's first curve, in Plotly's first colour (#636EFA), is on the screen
    blue = sum(1 for r, g, b in rgb.getdata() if abs(r - 0x63) < 25 and abs(g - 0x6E) < 25 and abs(b - 0xFA) < 25)
    assert blue > 200
