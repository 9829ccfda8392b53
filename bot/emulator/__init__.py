"""A local Slack emulator: the Web API, event delivery and interactivity, over real HTTP.

Used by the test suite, the benchmarks and `apprentice sandbox`. See `SlackEmulator`.
"""

from bot.emulator.delivery import Attempt, DeliveryResult
from bot.emulator.emulator import Delivery, SlackEmulator

__all__ = ["Attempt", "Delivery", "DeliveryResult", "SlackEmulator"]
