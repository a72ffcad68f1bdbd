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
    settings: str
    setting_commands: str
    reannounce: str
    problem: str
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
            settings=f"{base}/settings",
            setting_commands=f"{base}/settings/+/set",
            reannounce=f"{base}/reannounce",
            problem=f"{base}/problem",
            discovery=f"{settings.mqtt.discovery_prefix}/device/{settings.daemon.instance_id}/config",
            ha_status=settings.mqtt.ha_status_topic,
        )

    def retained_state_topics(self) -> tuple[str, ...]:
        """The retained topics the daemon owns, discovery first (`discovery --remove` clears it first)."""
        return (
            self.discovery,
            self.state,
            self.progress,
            self.last_run,
            self.runs,
            self.model,
            self.adapter,
            self.decision,
            self.settings,
            self.problem,
            self.availability,
        )

    def setting_command(self, name: str) -> str:
        """Where Home Assistant sends a new value for one setting."""
        return f"{self.settings}/{name}/set"

    def setting_name(self, topic: str) -> str | None:
        """The setting a command topic is for, or None when the topic is no setting's command topic."""
        prefix, suffix = f"{self.settings}/", "/set"
        if not (topic.startswith(prefix) and topic.endswith(suffix)):
            return None
        name = topic[len(prefix) : -len(suffix)]
        return name if name and "/" not in name else None
