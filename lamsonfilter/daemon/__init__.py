"""The daemon layer: what every transport's long-running process shares.

`runtime` runs the application for a message (replay, deadline, poison
counting, outbox wake-up, the log line, metrics); `process` holds the socket
file, TCP_NODELAY, signals and reload; `service` talks to systemd; `metrics`
serves Prometheus; `endpoint` parses listening addresses and holds the one
loopback rule; `poison` counts attempts at messages that kill the process.
"""
