#!/usr/bin/env python3
"""Helpers of scripts/bench-tunnel.sh: an echo server, a counting sink, a small-request
latency probe and the office-like corpus sender. Standard library only."""
import base64
import json
import os
import random
import socket
import statistics
import sys
import threading
import time
import zipfile
import io


def serve(port, handler):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", port))
    s.listen(128)
    while True:
        c, _ = s.accept()
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=handler, args=(c,), daemon=True).start()


def echo(c):
    try:
        while True:
            d = c.recv(65536)
            if not d:
                break
            c.sendall(d)
    finally:
        c.close()


def sink(c):
    n = 0
    try:
        while True:
            d = c.recv(262144)
            if not d:
                break
            n += len(d)
        c.sendall(str(n).encode())
    finally:
        c.close()


def latency(port, count, size):
    """p50 and p99 round trip, microseconds, of `count` requests of `size` bytes."""
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    msg = os.urandom(size)
    rtts = []
    for i in range(count + 50):
        t = time.perf_counter_ns()
        s.sendall(msg)
        got = 0
        while got < size:
            d = s.recv(size - got)
            if not d:
                raise SystemExit("closed")
            got += len(d)
        if i >= 50:  # warm-up
            rtts.append((time.perf_counter_ns() - t) / 1000)
    s.close()
    rtts.sort()
    print(json.dumps({"p50_us": rtts[len(rtts) // 2], "p99_us": rtts[len(rtts) * 99 // 100]}))


WORDS = ("the of and to in is for on with that report budget meeting quarter project "
         "customer invoice schedule review please attached regards team update sales "
         "delivery contract order status draft final version approve comment office "
         "market revenue cost plan result data policy department manager employee").split()


def text(rng, n):
    return " ".join(rng.choice(WORDS) for _ in range(n))


def corpus(seed=7):
    """Documents an office sends and fetches: HTML pages, JSON API calls, e-mail with
    attachments (base64), documents (text, CSV, and zipped .docx-like files)."""
    rng = random.Random(seed)
    docs = []
    for i in range(60):  # HTML pages
        rows = "".join(f"<tr><td class=\"c{j%5}\">{text(rng, 6)}</td><td>{rng.randint(1, 99999)}</td></tr>\n"
                       for j in range(rng.randint(50, 300)))
        docs.append(("html", f"<!DOCTYPE html><html><head><title>{text(rng, 4)}</title>"
                     f"<link rel=\"stylesheet\" href=\"/s/main.css\"></head><body><div class=\"nav\">"
                     f"{text(rng, 30)}</div><table>{rows}</table></body></html>".encode()))
    for i in range(400):  # JSON API calls
        items = [{"id": rng.randint(1, 10**6), "name": text(rng, 3), "status": rng.choice(["open", "closed", "pending"]),
                  "amount": round(rng.random() * 1000, 2), "owner": {"id": rng.randint(1, 500), "email": f"user{rng.randint(1,500)}@example.com"}}
                 for _ in range(rng.randint(5, 60))]
        docs.append(("json", json.dumps({"page": i, "items": items}).encode()))
    for i in range(40):  # e-mail with attachments
        att_csv = "\n".join(",".join(str(rng.randint(0, 9999)) for _ in range(8)) for _ in range(rng.randint(200, 1500))).encode()
        att_img = bytes(rng.getrandbits(8) for _ in range(rng.randint(5000, 40000)))  # a photo: incompressible
        body = (f"From: a{i}@example.com\r\nTo: team@example.com\r\nSubject: {text(rng, 5)}\r\n"
                f"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=XX\r\n\r\n--XX\r\n"
                f"Content-Type: text/plain\r\n\r\n{text(rng, 300)}\r\n--XX\r\nContent-Type: text/csv\r\n"
                f"Content-Transfer-Encoding: base64\r\n\r\n").encode()
        body += base64.encodebytes(att_csv)
        body += b"\r\n--XX\r\nContent-Type: image/jpeg\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        body += base64.encodebytes(att_img) + b"\r\n--XX--\r\n"
        docs.append(("mail", body))
    for i in range(30):  # documents
        txt = "\n\n".join(text(rng, rng.randint(50, 200)) for _ in range(rng.randint(20, 80))).encode()
        if i % 3 == 0:
            b = io.BytesIO()
            with zipfile.ZipFile(b, "w", zipfile.ZIP_DEFLATED) as z:
                z.writestr("word/document.xml", b"<w:document><w:body>" + txt + b"</w:body></w:document>")
            docs.append(("docx", b.getvalue()))
        else:
            docs.append(("txt", txt))
    return docs


def send_corpus(port):
    docs = corpus()
    total = 0
    for kind, d in docs:
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(d)
        s.shutdown(socket.SHUT_WR)
        got = b""
        while True:
            x = s.recv(64)
            if not x:
                break
            got += x
        s.close()
        if int(got or b"0") != len(d):
            raise SystemExit(f"sink got {got!r} of {len(d)}")
        total += len(d)
    import zlib
    z = sum(len(zlib.compress(d, 6)) for _, d in docs)
    print(json.dumps({"docs": len(docs), "bytes": total, "zlib6_per_doc_ratio": round(z / total, 3)}))


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "echo":
        serve(int(sys.argv[2]), echo)
    elif cmd == "sink":
        serve(int(sys.argv[2]), sink)
    elif cmd == "latency":
        latency(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
    elif cmd == "corpus":
        send_corpus(int(sys.argv[2]))
