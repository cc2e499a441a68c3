"""A libp2p-free transport: TLS 1.3 over TCP, Ed25519 identities, signed records spread by gossip.

Never imports hivemind, directly or through other swarm modules (tests check this in a process
where `import hivemind` fails). Modules, bottom up: `identity` (key file, peer ids), `addresses`
(multiaddrs), `channel` (authenticated, encrypted, framed connections), `records` (signed record
store), `node` (the gossip node on its own event loop thread), `transport` (`TcpTransport`).
"""
