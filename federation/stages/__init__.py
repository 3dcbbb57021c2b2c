"""The stages of the server's slot-update pipeline (:mod:`layerfed.federation.pipeline`).

Each stage module holds one function of typed, frozen inputs that returns a typed
result carrying the audit events and metric counts it produced. Stages never
import the pipeline or each other (an import-linter contract says so).
"""

__all__: list[str] = []
