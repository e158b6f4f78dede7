"""The daemon layer: what every transport's long-running process shares.

`runtime` is the transport contract (`Runtime.process`: replay, deadline,
the log line, metrics, outbox wake-up; poison counting; `replay_key`);
`steps` is the one MAIL/RCPT step; `process` holds the socket file,
TCP_NODELAY, signals and reload; `service` talks to systemd; `metrics`
serves Prometheus; `endpoint` parses listening addresses and holds the one
loopback rule; `poison` counts attempts at messages that kill the process.
"""
