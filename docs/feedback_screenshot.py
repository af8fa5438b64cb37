"""Make docs/feedback-page.png, the README's picture of the ranking page of `palm feedback serve`:
a small illustrative batch (hand-written replies, not a model's), two replies already placed with
the keys, in headless Chromium. Run: .venv/bin/python docs/feedback_screenshot.py"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from palm.apps.feedback.app import create_app, serve  # noqa: E402
from palm.apps.feedback.sample import BATCH_FORMAT  # noqa: E402
from palm.apps.feedback.store import RankingsFile  # noqa: E402

PROMPT = "What does `json.dumps` do?"
REPLIES = [
    "It serializes a Python object to a JSON formatted string. For example json.dumps({\"a\": 1}) "
    "returns '{\"a\": 1}'; indent= pretty-prints and sort_keys=True orders the keys.",
    "json.dumps json.dumps json.dumps json.dumps json.dumps json.dumps json.dumps",
    "It reads JSON from a file and returns the Python object it holds.",
    "Serialize obj to a JSON formatted str. dumps(obj, *, skipkeys=False, ensure_ascii=True, indent=None)",
]


def main(out: Path = ROOT / "docs" / "feedback-page.png") -> None:
    from PIL import Image
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    tmp = Path(tempfile.mkdtemp())
    items = [{"format": BATCH_FORMAT, "batch": "batch-1", "item": f"demo{i}", "index": i,
              "prompt": [{"role": "user", "content": PROMPT if i == 2 else f"Question {i + 1}?"}],
              "replies": REPLIES if i == 2 else ["a", "b", "c", "d"], "model": {}, "sampling": {}}
             for i in range(12)]
    (tmp / "batch-1.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
    rankings = tmp / "rankings.jsonl"
    for i in (0, 1):  # two items already judged: the page resumes at the third
        RankingsFile(rankings).append({**items[i], "format": "palm-rankings/1", "verdict": "ranked",
                                       "order": [0, 1, 2, 3], "labeler": "alice", "time": "2026-01-01T00:00:00Z"})
    app = create_app(tmp / "batch-1.jsonl", rankings, "alice")
    urls: list[str] = []
    threading.Thread(target=serve, args=(app, "127.0.0.1", 0, urls.append), daemon=True).start()
    opts = webdriver.ChromeOptions()
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=980,900",
                 "--hide-scrollbars"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=shutil.which("chromedriver")), options=opts)
    try:
        WebDriverWait(driver, 10).until(lambda d: urls)
        driver.get(urls[0])
        WebDriverWait(driver, 10).until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-item") == "2")
        body = driver.find_element(By.TAG_NAME, "body")
        body.send_keys("1")
        body.send_keys("4")
        driver.save_screenshot(str(tmp / "page.png"))
    finally:
        driver.quit()
    img = Image.open(tmp / "page.png").convert("RGB")
    img = img.crop((0, 0, img.width, min(img.height, 600)))
    img.quantize(colors=64).save(out, optimize=True)
    print(f"{out}: {out.stat().st_size // 1024} KB")


if __name__ == "__main__":
    main()
