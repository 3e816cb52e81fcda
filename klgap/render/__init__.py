"""Report pages and the terminal, rebuilt from saved reports: page blocks (blocks.py), number formatting
(formatting.py), report.md / report.html (pages.py and its section pages), what the terminal prints (console.py)."""
