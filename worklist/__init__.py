"""The radiologist worklist: server-rendered pages and a JSON API over the triage database.

Radiologists see studies in triage order and open them with their heatmaps; hospital IT sees
the system's health.  Everything shown is decision support, not for diagnostic use.
"""
