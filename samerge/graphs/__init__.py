"""Connectivity graphs per architecture family (data) and the one walker that computes flows on them."""

from samerge.graphs.families import FAMILY_TEMPLATES, SUPPORTED, build_chain, build_graph, build_transformer
from samerge.graphs.spec import (Attention, ChainGraph, ChainLayer, Factor, FlowFactors, Mlp, Ref, Stack,
                                 TransformerGraph)
from samerge.graphs.walker import FlowComputer, LockstepSource, LogVec, dense_flow, flow_factors, lockstep_flows

__all__ = ["FAMILY_TEMPLATES", "SUPPORTED", "Attention", "ChainGraph", "ChainLayer", "Factor", "FlowComputer",
           "FlowFactors", "LockstepSource", "LogVec", "Mlp", "Ref", "Stack", "TransformerGraph", "build_chain", "build_graph",
           "build_transformer", "dense_flow", "flow_factors", "lockstep_flows"]
