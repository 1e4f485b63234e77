"""HTTP routes: thin functions that parse, call one service function and return a schema.

Each router carries its full path prefix (not one added at include time), so `scope["route"].path`
is the whole template the metrics label requests with.
"""

API_PREFIX = "/v1"
