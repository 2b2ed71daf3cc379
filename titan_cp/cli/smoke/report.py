"""The smoke summary: one table for people, one JUnit XML for CI systems."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from titan_cp.cli.smoke.checks import Outcome
from titan_cp.cli.smoke.plan import ShippedConfig


def table(outcomes: list[Outcome], skipped: list[ShippedConfig]) -> str:
    """Markdown: config, layout, result, step time, peak memory per rank."""
    lines = ["| config | ranks | layout | result | step time | peak memory per rank (GiB) |",
             "|---|---:|---|---|---:|---|"]
    for o in outcomes:
        failed = [name for name, ok, _ in o.checks if not ok]
        result = "PASS" if o.passed else "FAIL: " + ", ".join(failed)
        step = "-" if o.step_time_s is None else f"{o.step_time_s:.2f} s"
        peaks = " ".join("-" if p != p else f"{p:.2f}" for p in o.peak_gib_per_rank) or "-"
        lines.append(f"| {o.config.name} | {o.config.world} | {o.config.layout} | {result} | {step} | {peaks} |")
    for c in skipped:
        lines.append(f"| {c.name} | - | - | skipped: {c.skip} | - | - |")
    return "\n".join(lines) + "\n"


def details(outcomes: list[Outcome]) -> str:
    return "".join(
        f"{o.config.name}: {'ok  ' if ok else 'FAIL'} {name}: {detail}\n" for o in outcomes for name, ok, detail in o.checks
    )


def junit_xml(outcomes: list[Outcome], skipped: list[ShippedConfig], seconds: float) -> str:
    """One <testcase> per (config, check); skipped configs as <skipped/> cases."""
    n_tests = sum(len(o.checks) for o in outcomes) + len(skipped)
    n_fail = sum(not ok for o in outcomes for _, ok, _ in o.checks)
    suite = ET.Element("testsuite", name="titan_cp.cli.smoke", tests=str(n_tests), failures=str(n_fail),
                       errors="0", skipped=str(len(skipped)), time=f"{seconds:.1f}")
    for o in outcomes:
        for name, ok, detail in o.checks:
            case = ET.SubElement(suite, "testcase", classname=f"smoke.{o.config.name}", name=name)
            if ok:
                ET.SubElement(case, "system-out").text = detail
            else:
                ET.SubElement(case, "failure", message=detail[:500]).text = detail
    for c in skipped:
        case = ET.SubElement(suite, "testcase", classname=f"smoke.{c.name}", name="smoke")
        ET.SubElement(case, "skipped", message=c.skip)
    ET.indent(suite)
    return ET.tostring(ET.ElementTree(suite).getroot(), encoding="unicode", xml_declaration=True) + "\n"
