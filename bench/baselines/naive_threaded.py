"""Reference registry (a): naive threaded Python, as an instructor would write it.

socketserver.ThreadingTCPServer, one thread per client, blocking sockets.
Copied from the reference kit; the request is read up to its first space
(the benchmark sends "IP:PORT verify=no"). Defaults kept on purpose (listen backlog = request_queue_size = 5), except
with --backlog N.  Usage: python registry_threaded.py PORT [--backlog N]
"""

import socket
import socketserver
import sys


class Handler(socketserver.BaseRequestHandler):
    def handle(self):
        data = self.request.recv(1024).decode().split()[0]  # "IP:PORT verify=no"
        ip, port = data.split(":")
        if not ip.startswith("127."):  # a baseline dials loopback only, whoever asks
            return
        with socket.create_connection((ip, int(port))) as s:
            s.sendall(b"HELLO from registry\n")
        self.request.sendall(f"OK {ip}:{port}\n".encode())


class Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass  # the default prints a traceback per bad request; keep output quiet


def main():
    port = int(sys.argv[1])
    if "--backlog" in sys.argv:
        Server.request_queue_size = int(sys.argv[sys.argv.index("--backlog") + 1])
    with Server(("127.0.0.1", port), Handler) as srv:
        srv.serve_forever()


if __name__ == "__main__":
    main()
