"""The defence against floods and stalls: admission, rate limits, the attack
window, bans and the silent drop. Pure: time is handed in."""
