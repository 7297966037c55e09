"""Engines: one class per backend behind edgecap.runtime.engine.Engine."""
