"""The surfaces devices reach: WebSocket (websocket.py) and HTTP (http.py)."""
