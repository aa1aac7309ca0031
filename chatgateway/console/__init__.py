"""The web console (docs/console.md): a chat page and an operator page served by the gateway.

``static/`` holds the pages, their scripts and styles, served as they are (no build step,
nothing from another origin); ``resources`` mounts them under /console/ with a strict
Content-Security-Policy (``headers``); ``status`` samples what the operator page shows,
and ``admin`` decides who may read it.
"""
