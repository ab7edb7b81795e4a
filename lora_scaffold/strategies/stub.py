"""`stub`: a skeleton to fill in by hand; its methods raise NotImplementedError until then."""

from __future__ import annotations

from lora_scaffold.strategies.base import Evidence, Strategy, Verdict


class Stub(Strategy):
    name = family = "stub"
    help = "a skeleton to fill in by hand (its generated tests fail until you do)"
    summary = "A skeleton to fill in; its methods raise NotImplementedError until then."
    partial = "partials/stub.jinja"
    tried_by_auto = False
    needs_probe = False
    no_dora = "a stub implements no variants until it is written"

    def judge(self, evidence: Evidence) -> tuple[Verdict, ...]:
        return (Verdict(self, True, 0.0, "asked for"),)

    def reason(self, evidence: Evidence, verdict: Verdict) -> str:
        return "asked for with --strategy stub: the layer is a skeleton to fill in"


STUB = Stub()
