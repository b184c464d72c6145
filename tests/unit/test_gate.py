"""The serve gate: one holder at a time, a stuck holder is passed by."""
import threading

from _cura_connection.gate import ServeGate


def test_serve_gate_one_holder_and_a_stuck_one():
    gate = ServeGate()
    gate.STUCK = 0.05
    assert gate.enter()
    inside = []
    waiter = threading.Thread(target=lambda: inside.append(gate.enter()))
    waiter.start()
    # the holder stays: the waiter goes on without the gate
    waiter.join(10.)
    assert inside == [False]
    gate.leave()
    # once free, the gate lets the next one in, and out again
    assert gate.enter()
    gate.breathe()
    gate.leave()
    assert not gate.lock.locked()


def test_serve_gate_hands_over():
    # Threads queued at the gate all get through, one at a time
    gate = ServeGate()
    gate.STUCK = 60.     # a loaded test machine is no stuck holder
    held, peak, done = [0], [0], []
    lock = threading.Lock()

    def worker():
        for _ in range(50):
            assert gate.enter()
            with lock:
                held[0] += 1
                peak[0] = max(peak[0], held[0])
            gate.breathe()
            with lock:
                held[0] -= 1
            gate.leave()
        done.append(1)
    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60.)
    assert len(done) == 8 and peak[0] == 1
