"""Writes LOGDIR/summary.md from what benchmarks/gpu_check.sh left in LOGDIR: steps.tsv (each step's exit
status, seconds and limit), env.txt, the pytest JUnit XML, the kernel lists, the sanitizer logs and gpu.json.

    python benchmarks/gpu_check/summary.py LOGDIR
Prints the summary too; exit status 1 if anything failed."""
import json
import os
import re
import sys
import xml.etree.ElementTree as ET

from kernels import KERNELS, SANITIZERS

SANITIZER_ERROR_EXIT = 86  # gpu_check.sh passes --error-exitcode 86
TIMEOUT_EXITS = (124, 137)


def read_steps(out):
    steps = {}
    path = os.path.join(out, "steps.tsv")
    if os.path.exists(path):
        for line in open(path):
            name, rc, seconds, limit, log = line.rstrip("\n").split("\t")
            steps[name] = {"rc": int(rc), "seconds": float(seconds), "limit": int(limit), "log": log}
    return steps


def read(out, name):
    path = os.path.join(out, name)
    return open(path, errors="replace").read() if os.path.exists(path) else ""


def step_status(step):
    if step is None:
        return "not run"
    if step["rc"] in TIMEOUT_EXITS:
        return f"TIMEOUT after {step['limit']} s"
    return "ok" if step["rc"] == 0 else f"FAIL (exit {step['rc']})"


def _reports(text, kernel):
    return [ln for ln in text.splitlines()
            if ln.startswith("=========") and "SUMMARY" not in ln and re.search(rf"\b{kernel}\b", ln)]


def sanitizer_cell(out, step, kernel, family_kernels):
    if step is None:
        return "not run"
    if step["rc"] in TIMEOUT_EXITS:
        return "TIMEOUT"
    text = read(out, step["log"])
    reports = _reports(text, kernel)
    if reports:
        return f"FAIL ({len(reports)} report lines)"
    if step["rc"] == 0:
        return "pass"
    if step["rc"] == SANITIZER_ERROR_EXIT:  # errors found: on another kernel of the family, or on none by name
        return "pass" if any(_reports(text, k) for k in family_kernels) else "FAIL? (errors on no kernel by name: see log)"
    return f"driver failed (exit {step['rc']})"


def pytest_section(out, steps, dry):
    lines = []
    if dry:
        step = steps.get("collect cuda tests")
        if step is None:
            return ["- not run: " + (read(out, "pytest_skipped.txt").strip() or "see steps")]
        ids = [ln.split("::")[0] for ln in read(out, step["log"]).splitlines() if "::" in ln]
        for path in sorted(set(ids)):
            lines.append(f"- `{path}`: {ids.count(path)} tests collected")
        return lines + [f"- ({step_status(step)})"]
    step = steps.get("pytest cuda")
    xml_path = os.path.join(out, "pytest_cuda.xml")
    if step is None:
        return ["- not run: " + (read(out, "pytest_skipped.txt").strip() or "see steps")]
    if not os.path.exists(xml_path):
        return [f"- {step_status(step)}; no JUnit XML (see {step['log']})"]
    suite = ET.parse(xml_path).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    n = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    passed = n["tests"] - n["failures"] - n["errors"] - n["skipped"]
    lines.append(f"- {passed} passed, {n['failures'] + n['errors']} failed, {n['skipped']} skipped "
                 f"in {float(suite.get('time', 0)):.0f} s ({step_status(step)})")
    failed = []
    for case in suite.iter("testcase"):
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        if bad is not None:
            msg = (bad.get("message") or "").splitlines()[0][:160] if bad.get("message") else ""
            failed.append(f"  - `{case.get('classname')}::{case.get('name')}`: {msg}")
    lines += failed[:40] + ([f"  - ... and {len(failed) - 40} more"] if len(failed) > 40 else [])
    return lines


def kernel_section(out, steps, dry):
    if dry:
        lines = ["| family | kernels | drivers through the SIMT emulator |", "| --- | --- | --- |"]
        for fam, ks in KERNELS.items():
            lines.append(f"| {fam} | {', '.join(ks)} | {step_status(steps.get(f'emulator {fam}'))} |")
        return lines
    lines = ["| kernel | family | launched (profiler) | " + " | ".join(SANITIZERS) + " |",
             "| --- | --- | --- | " + " | ".join("---" for _ in SANITIZERS) + " |"]
    for fam, ks in KERNELS.items():
        listing = read(out, f"kernels_{fam}.json")
        ran = json.loads(listing)["ran"] if listing else {}
        for k in ks:
            launched = ("yes" if ran.get(k) else "NO") if listing else step_status(steps.get(f"kernels {fam}"))
            cells = [sanitizer_cell(out, steps.get(f"{tool} {fam}"), k, ks) for tool in SANITIZERS]
            if listing and not ran.get(k):  # the driver does not reach it: no sanitizer saw it
                cells = [c if c.startswith(("FAIL", "TIMEOUT", "driver")) else "not launched" for c in cells]
            lines.append(f"| {k} | {fam} | {launched} | " + " | ".join(cells) + " |")
    return lines


def main(out):
    steps = read_steps(out)
    dry = read(out, "mode.txt").strip() == "dry-run"
    env = read(out, "env.txt").strip().splitlines()
    failed = [n for n, s in steps.items() if s["rc"] != 0]
    title = "dry run (no GPU: checks that the GPU run will work)" if dry else "GPU run"
    lines = [f"# fastdistill GPU check: {title}", "",
             f"**{'all steps passed' if not failed else f'{len(failed)} step(s) failed: ' + ', '.join(failed)}**", "",
             "## Machine and tools", ""] + [f"- {e}" for e in env] + ["", "## Steps", "",
             "| step | status | seconds | limit (s) | log |", "| --- | --- | ---: | ---: | --- |"]
    lines += [f"| {n} | {step_status(s)} | {s['seconds']:.1f} | {s['limit']} | {s['log']} |" for n, s in steps.items()]
    total = read(out, "total_seconds.txt").strip()
    if total:
        lines += ["", f"Whole run before the summary: {total} s wall-clock"
                  + ("." if dry else " (the CUDA tests and the sanitizers run side by side).")]
    lines += ["", "## Build", ""]
    if dry:
        lines += [f"- {ln}" for name in ("build_config.log", "kernel_list.log") for ln in read(out, name).splitlines()
                  if ln.startswith(("build-config:", "kernels:", "FAIL:"))]
    else:
        build = steps.get("build")
        lines.append(f"- sm_90 build with MAX_JOBS=all cores: {build['seconds']:.0f} s ({step_status(build)})"
                     if build else "- not run")
    lines += ["", "## CUDA tests" + (" (collection only)" if dry else " (pytest -m cuda)"), ""]
    lines += pytest_section(out, steps, dry)
    lines += ["", "## Kernels" + ("" if dry else " x compute-sanitizer (kernel filter kns=fastdistill)"), ""]
    lines += kernel_section(out, steps, dry)
    lines += ["", "## GPU targets", ""]
    bench = os.path.join(out, "gpu.json")
    if os.path.exists(bench):
        from fastdistill.bench.gpu import targets_markdown

        with open(bench) as f:
            doc = json.load(f)
        if dry:
            lines += ["Dry run: the GPU cases on CPU tensors at toy sizes. The figures mean nothing; this shows "
                      "that the cases run and that the report reads the bench JSON.", ""]
        lines.append(targets_markdown(doc))
    else:
        lines.append(f"not measured: no gpu.json ({step_status(steps.get('bench'))})")
    for name in failed:  # the end of each failed step's log, so that the summary alone shows why
        tail = [ln[:200] for ln in read(out, steps[name]["log"]).splitlines() if ln.strip()][-8:]
        lines += ["", f"### {name}: last lines of {steps[name]['log']}", "", "```"] + tail + ["```"]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(text)
    print(text)
    return 1 if failed else 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} LOGDIR")
    sys.exit(main(sys.argv[1]))
