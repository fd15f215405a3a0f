"""The Open Inference Protocol (KServe v2) gateway: HTTP and gRPC in front of the router.

A separate process that poold supervises (pool/gateways.py); it talks to the router as an
ordinary ZeroMQ client of the frontend. Never imports torch.
"""
