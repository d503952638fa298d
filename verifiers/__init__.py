from verifiers.base import OutcomeItem, Status, Verdict, Verifier

__all__ = ["OutcomeItem", "Status", "Verdict", "Verifier"]
