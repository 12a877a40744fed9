"""US 2025/0265475 A1: server-side top-k with error feedback, and per-client sparse
downlink deltas without a model copy per client."""
from atoll.downlink.topk import server_topk
from atoll.downlink.tracker import DeltaTracker, apply, message

__all__ = ["server_topk", "DeltaTracker", "apply", "message"]
