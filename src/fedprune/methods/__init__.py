"""Federated methods: each a server half and a client half (see :mod:`.base`)."""

from fedprune.methods.base import ClientMethod, ClientReply, FederatedIO, ModelSpec, ServerMethod
from fedprune.methods.registry import MethodInfo, get_method, list_methods, register

__all__ = [
    "ClientMethod",
    "ClientReply",
    "FederatedIO",
    "MethodInfo",
    "ModelSpec",
    "ServerMethod",
    "get_method",
    "list_methods",
    "register",
]
