"""Topic names, built from settings in one place."""

from __future__ import annotations

from dataclasses import dataclass

from homeiq_trainer.settings import Settings

AVAILABLE = "online"
NOT_AVAILABLE = "offline"


@dataclass(frozen=True)
class Topics:
    """Every topic this instance uses."""

    base: str
    availability: str
    command: str
    response: str
    state: str
    progress: str
    last_run: str
    runs: str
    model: str
    adapter: str
    decision: str
    event: str
    discovery: str
    ha_status: str

    @classmethod
    def from_settings(cls, settings: Settings) -> Topics:
        base = settings.mqtt.base_topic
        return cls(
            base=base,
            availability=f"{base}/availability",
            command=f"{base}/command",
            response=f"{base}/response",
            state=f"{base}/state",
            progress=f"{base}/progress",
            last_run=f"{base}/last_run",
            runs=f"{base}/runs",
            model=f"{base}/model",
            adapter=f"{base}/adapter",
            decision=f"{base}/decision",
            event=f"{base}/event",
            discovery=f"{settings.mqtt.discovery_prefix}/device/{settings.daemon.instance_id}/config",
            ha_status=settings.mqtt.ha_status_topic,
        )

    def retained_state_topics(self) -> tuple[str, ...]:
        """The retained topics the daemon owns, discovery and availability included."""
        return (
            self.discovery,
            self.state,
            self.progress,
            self.last_run,
            self.runs,
            self.model,
            self.adapter,
            self.decision,
            self.availability,
        )
