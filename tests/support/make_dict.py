#!/usr/bin/env python3
"""Write a synthetic Klipper MCU data dictionary for Klippy's file-output mode.

With no MCU attached, Klippy (started with "-o /dev/null -d FILE") only needs
the message formats that its host code looks up for the configured objects.
This declares those for heaters (ADC + PWM/digital out), fans, output pins,
and unless minimal also steppers, endstops and homing.  Nothing here comes
from a real firmware build: message ids are arbitrary but unique.  Pins
PA0..PA31 and PB0..PB31 are available to printer.cfg.

    python3 make_dict.py OUTPUT [--minimal]
    json.dump(make_dict.build(minimal=False), f)
"""
import json
import sys

# Messages every Klippy version asks for, whatever the config.
CORE_COMMANDS = [
    "identify offset=%u count=%c",
    "get_uptime",
    "get_clock",
    "get_config",
    "allocate_oids count=%c",
    "finalize_config crc=%u",
    "emergency_stop",
    "clear_shutdown",
    "reset",
]
CORE_RESPONSES = [
    "identify_response offset=%u data=%.*s",
    "uptime high=%u clock=%u",
    "clock clock=%u",
    "config is_config=%c crc=%u is_shutdown=%c move_count=%hu",
    "shutdown clock=%u static_string_id=%hu",
    "is_shutdown static_string_id=%hu",
    "stats count=%u sum=%u sumsq=%u",
]
# Heaters, fans, output pins.  The single-value analog_in forms are the older
# protocol, which all tested Klippy versions still accept.
IO_COMMANDS = [
    "config_analog_in oid=%c pin=%u",
    "query_analog_in oid=%c clock=%u sample_ticks=%u sample_count=%c"
    " rest_ticks=%u min_value=%hu max_value=%hu range_check_count=%c",
    "config_digital_out oid=%c pin=%u value=%c default_value=%c"
    " max_duration=%u",
    "set_digital_out_pwm_cycle oid=%c cycle_ticks=%u",
    "queue_digital_out oid=%c clock=%u on_ticks=%u",
    "update_digital_out oid=%c value=%c",
    "set_digital_out pin=%u value=%c",
    "config_pwm_out oid=%c pin=%u cycle_ticks=%u value=%hu"
    " default_value=%hu max_duration=%u",
    "queue_pwm_out oid=%c clock=%u value=%hu",
    "set_pwm_out pin=%u cycle_ticks=%u value=%hu",
]
IO_RESPONSES = [
    "analog_in_state oid=%c next_clock=%u value=%hu",
]
# Steppers, endstops and trsync homing (for kinematics other than none).
MOTION_COMMANDS = [
    "config_stepper oid=%c step_pin=%c dir_pin=%c invert_step=%c"
    " step_pulse_ticks=%u",
    "queue_step oid=%c interval=%u count=%hu add=%hi",
    "set_next_step_dir oid=%c dir=%c",
    "reset_step_clock oid=%c clock=%u",
    "stepper_get_position oid=%c",
    "stepper_stop_on_trigger oid=%c trsync_oid=%c",
    "config_endstop oid=%c pin=%c pull_up=%c",
    "endstop_home oid=%c clock=%u sample_ticks=%u sample_count=%c"
    " rest_ticks=%u pin_value=%c trsync_oid=%c trigger_reason=%c",
    "endstop_query_state oid=%c",
    "config_trsync oid=%c",
    "trsync_start oid=%c report_clock=%u report_ticks=%u expire_reason=%c",
    "trsync_set_timeout oid=%c clock=%u",
    "trsync_trigger oid=%c reason=%c",
]
MOTION_RESPONSES = [
    "stepper_position oid=%c pos=%i",
    "endstop_state oid=%c homing=%c next_clock=%u pin_value=%c",
    "trsync_state oid=%c can_trigger=%c trigger_reason=%c clock=%u",
]

CONSTANTS = {
    "MCU": "ci_fake",            # free text, shown in the log and mcu status
    "CLOCK_FREQ": 16000000,      # Klippy rejects very high clock rates
    "ADC_MAX": 4095,
    "PWM_MAX": 255,
    "STATS_SUMSQ_BASE": 256,
    "RECEIVE_WINDOW": 192,
    "SERIAL_BAUD": 250000,
}

# A range enum "ROOTstart": [first_value, count] defines PA0..PA31 etc.
ENUMERATIONS = {
    "pin": {"PA0": [0, 32], "PB0": [32, 32]},
    "static_string_id": {"fake shutdown": 0},
}


def build(minimal=False):
    commands = CORE_COMMANDS + IO_COMMANDS
    responses = CORE_RESPONSES + IO_RESPONSES
    if not minimal:
        commands += MOTION_COMMANDS
        responses += MOTION_RESPONSES
    # Ids 0 and 1 are what real firmware uses for identify_response/identify.
    ids = {"identify_response offset=%u data=%.*s": 0,
           "identify offset=%u count=%c": 1}
    for fmt in commands + responses:
        if fmt not in ids:
            ids[fmt] = len(ids)
    return {
        "version": "ci-fake-dict-1",
        "build_versions": "none (synthetic dictionary for file-output mode)",
        "config": dict(CONSTANTS),
        "enumerations": ENUMERATIONS,
        "commands": {f: ids[f] for f in commands},
        "responses": {f: ids[f] for f in responses},
    }


def write(path, minimal=False):
    with open(path, "w") as f:
        json.dump(build(minimal), f, indent=1, sort_keys=True)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    write(sys.argv[1], minimal="--minimal" in sys.argv[2:])
