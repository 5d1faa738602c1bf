// student_server.cpp -- Lab 3, Part 1: the listening server, written from the lab text.
//
// Build:  g++ -o student_server student_server.cpp -std=c++11
// Run:    ./student_server [PORT]
//
// PORT defaults to STUDENT_SERVER_PORT below, as in the lab. The optional
// argument lets the project's tests pass a free port; 0 asks the kernel for
// one, and the port really bound is the one printed.

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <string>

#define STUDENT_SERVER_PORT 15000

// Parse a port from argv; exit with a usage message when it is not 0-65535.
static int parse_port(const char *text) {
    char *end = nullptr;
    errno = 0;
    long value = std::strtol(text, &end, 10);
    if (errno != 0 || end == text || *end != '\0' || value < 0 || value > 65535) {
        std::cerr << "usage: student_server [PORT]  (PORT: 0-65535, got '" << text << "')"
                  << std::endl;
        std::exit(64);
    }
    return static_cast<int>(value);
}

int main(int argc, char *argv[]) {
    int port = argc > 1 ? parse_port(argv[1]) : STUDENT_SERVER_PORT;

    // a. Create socket.
    int server_fd = socket(AF_INET, SOCK_STREAM, 0);
    if (server_fd < 0) {
        perror("socket");
        return 1;
    }

    // b. SO_REUSEADDR, so a restarted server does not wait out TIME_WAIT.
    int optval = 1;
    if (setsockopt(server_fd, SOL_SOCKET, SO_REUSEADDR, &optval, sizeof(optval)) < 0) {
        perror("setsockopt");
        close(server_fd);
        return 1;
    }

    // c. Our address: every interface (INADDR_ANY), the chosen port.
    struct sockaddr_in server_addr;
    std::memset(&server_addr, 0, sizeof(server_addr));
    server_addr.sin_family = AF_INET;
    server_addr.sin_addr.s_addr = INADDR_ANY;
    server_addr.sin_port = htons(port);

    // d. Bind.
    if (bind(server_fd, (struct sockaddr *)&server_addr, sizeof(server_addr)) < 0) {
        perror("bind");
        close(server_fd);
        return 1;
    }

    // e. Listen, backlog 5.
    if (listen(server_fd, 5) < 0) {
        perror("listen");
        close(server_fd);
        return 1;
    }

    // With port 0 the kernel chose the port: print the one really bound.
    socklen_t server_addr_len = sizeof(server_addr);
    if (getsockname(server_fd, (struct sockaddr *)&server_addr, &server_addr_len) < 0) {
        perror("getsockname");
        close(server_fd);
        return 1;
    }

    // f. The lab's listening message.
    std::cout << "Student server listening on port " << ntohs(server_addr.sin_port) << "..."
              << std::endl;

    // g. Accept one connection: the instructor's registry calling back.
    struct sockaddr_in instructor_addr;
    socklen_t instructor_addr_len = sizeof(instructor_addr);
    int instructor_conn_fd =
        accept(server_fd, (struct sockaddr *)&instructor_addr, &instructor_addr_len);
    if (instructor_conn_fd < 0) {
        perror("accept");
        close(server_fd);
        return 1;
    }
    char instructor_ip[INET_ADDRSTRLEN];
    if (inet_ntop(AF_INET, &instructor_addr.sin_addr, instructor_ip, sizeof(instructor_ip)) ==
        nullptr) {
        perror("inet_ntop");
        close(instructor_conn_fd);
        close(server_fd);
        return 1;
    }
    std::cout << "Connection accepted from instructor's server at " << instructor_ip << ":"
              << ntohs(instructor_addr.sin_port) << std::endl;

    // h. (Optional) receive the registry's message and print it: one recv(), as the lab says.
    char buffer[1024];
    ssize_t received = recv(instructor_conn_fd, buffer, sizeof(buffer) - 1, 0);
    if (received < 0) {
        perror("recv");
    } else if (received > 0) {
        std::string message(buffer, static_cast<size_t>(received));
        while (!message.empty() && (message.back() == '\n' || message.back() == '\r')) {
            message.pop_back();
        }
        std::cout << message << std::endl;
    }

    // i. Close the connection, then the listening socket.
    close(instructor_conn_fd);
    close(server_fd);
    return 0;
}
