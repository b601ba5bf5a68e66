"""One HTTP exchange through the sidecar, sans-IO: request plan, response handlers."""

from extproc.exchange.actions import BUFFERED, STREAMED, Action, Step, error_action
from extproc.exchange.exchange import Exchange
from extproc.exchange.phases import Phase
from extproc.state.lookup import Lookup

__all__ = ["BUFFERED", "STREAMED", "Action", "Exchange", "Lookup", "Phase", "Step", "error_action"]
