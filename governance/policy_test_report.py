"""Results of policy test cases, as text for people and JUnit XML for CI."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["CaseResult", "Outcome", "junit_xml", "text_report"]


@dataclass(frozen=True)
class Outcome:
    """What the policy decided for one case, and the trace of how."""

    decision: str
    reason: str = ""
    slots: tuple[str, ...] | None = None
    trace: tuple[str, ...] = ()

    def summary(self) -> str:
        """``decision (reason)`` or the slot list."""
        if self.slots is not None:
            return "slots " + ", ".join(self.slots)
        return f"{self.decision} ({self.reason})" if self.reason else self.decision


@dataclass(frozen=True)
class CaseResult:
    """One case: where it is, what was expected, what happened."""

    file: str
    line: int
    name: str
    expected: str
    actual: Outcome
    ok: bool

    @property
    def where(self) -> str:
        """``FILE:LINE`` of the case."""
        return f"{self.file}:{self.line}"


def text_report(results: Sequence[CaseResult]) -> str:
    """Each failure with file:line, expected, actual and the explain trace; then a summary."""
    lines: list[str] = []
    for r in results:
        if r.ok:
            continue
        lines.append(f"{r.where}: FAIL {r.name!r}")
        lines.append(f"  expected: {r.expected}")
        lines.append(f"  actual:   {r.actual.summary()}")
        lines.extend(f"    {step}" for step in r.actual.trace)
    failed = sum(not r.ok for r in results)
    lines.append(f"{len(results) - failed} passed, {failed} failed")
    return "\n".join(lines)


def junit_xml(results: Sequence[CaseResult]) -> str:
    """A JUnit XML document: one testsuite per test file, one testcase per case."""
    root = ET.Element("testsuites", name="layerfed policy test")
    by_file: dict[str, list[CaseResult]] = {}
    for r in results:
        by_file.setdefault(r.file, []).append(r)
    for file, cases in by_file.items():
        failures = sum(not r.ok for r in cases)
        suite = ET.SubElement(
            root, "testsuite", name=file, tests=str(len(cases)), failures=str(failures)
        )
        for r in cases:
            case = ET.SubElement(
                suite, "testcase", classname=file, name=r.name, file=file, line=str(r.line)
            )
            if not r.ok:
                failure = ET.SubElement(
                    case,
                    "failure",
                    message=f"expected {r.expected}, got {r.actual.summary()}",
                    type="PolicyTestFailure",
                )
                failure.text = "\n".join([r.where, *r.actual.trace])
    root.set("tests", str(len(results)))
    root.set("failures", str(sum(not r.ok for r in results)))
    return ET.tostring(root, encoding="unicode", xml_declaration=True)
