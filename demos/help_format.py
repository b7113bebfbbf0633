"""argparse help for the demos: each option's default shown once.

argparse's ArgumentDefaultsHelpFormatter appends "(default: X)" to every option, also where the
help text already says what the default is (then twice) and where X is None (no information).
"""

from __future__ import annotations

import argparse


class DefaultsOnce(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" only where the help does not mention a default and X is not None."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default is None or action.default is argparse.SUPPRESS:
            return text
        return super()._get_help_string(action)
