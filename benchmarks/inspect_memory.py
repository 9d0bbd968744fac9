"""
Does the request inspector cost memory on big bodies?  Streams one upload and one
download of SIZE through a relay and a connector on 127.0.0.1, once without and once
with `--inspect`, and reports the connector's peak RSS (VmHWM) growth for each, plus
what the inspector recorded (all bytes counted, only --inspect-body-bytes kept).

    python -m benchmarks.inspect_memory [--size-mib 1024]
"""

from __future__ import annotations

import argparse
import base64
import json
import urllib.request

from benchmarks.transfer import (
    children, download, expected_sha, free_port, proc_status, relay_env, save_result, start_app,
    start_connector, start_relay, upload,
)


def run_once(size: int, inspect: bool) -> dict:
    env = relay_env()
    with children() as popen:
        app, app_port = start_app(popen)
        relay, relay_port = start_relay(popen, env)
        inspect_port = free_port()
        extra = ["--inspect", f"tcp:{inspect_port}:interface=127.0.0.1"] if inspect else []
        connector = start_connector(popen, env, app_port, relay_port, extra_args=extra)
        base = proc_status(connector.pid, "VmRSS")
        up_seconds, answer = upload(relay_port, size)
        up_ok = answer.decode() == f"{size} {expected_sha(size)}"
        down_seconds, digest = download(relay_port, size)
        down_ok = digest == expected_sha(size)
        peak = proc_status(connector.pid, "VmHWM")
        result = {
            "inspect": inspect, "sha256_ok": up_ok and down_ok,
            "upload_mb_per_s": round(size / up_seconds / 1e6, 1),
            "download_mb_per_s": round(size / down_seconds / 1e6, 1),
            "connector_rss_before_mib": round(base / 2**20, 1),
            "connector_peak_rss_growth_mib": round((peak - base) / 2**20, 1),
        }
        if inspect:
            with urllib.request.urlopen(f"http://127.0.0.1:{inspect_port}/api/requests", timeout=10) as r:
                entries = json.load(r)["requests"]
            result["recorded"] = [{k: e[k] for k in ("method", "path", "status", "request_size", "response_size")}
                                  for e in entries]
            for e in entries:
                with urllib.request.urlopen(f"http://127.0.0.1:{inspect_port}/api/requests/{e['id']}",
                                            timeout=10) as r:
                    detail = json.load(r)
                kept = {part: len(base64.b64decode(detail[part]["body"])) for part in ("request", "response")}
                [row] = [x for x in result["recorded"] if x["path"] == e["path"]]
                row["kept"] = kept
        return result


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mib", type=int, default=1024)
    args = parser.parse_args()
    size = args.size_mib * 1024 * 1024
    results = {"size_mib": args.size_mib, "runs": [run_once(size, False), run_once(size, True)]}
    print(json.dumps(results, indent=2))
    save_result("inspect_memory", results)
    return 0 if all(r["sha256_ok"] for r in results["runs"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
