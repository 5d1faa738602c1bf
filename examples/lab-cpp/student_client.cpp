// student_client.cpp -- Lab 3, Part 2: the reporting client, written from the lab text.
//
// Build:  g++ -o student_client student_client.cpp -std=c++11
// Run:    ./student_client [REGISTRY_IP REGISTRY_PORT [MY_SERVER_IP [MY_SERVER_PORT]]]
//
// Exactly as the lab: it connects, sends "IP:PORT" with NO newline, prints
// what it sent and closes at once, without waiting for a reply. The registry
// frames the request by the close (EOF) and still calls the server back.
// The defaults are the #defines below; the optional arguments let the
// project's tests pass loopback and ephemeral ports.

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

#define INSTRUCTOR_REGISTRY_IP "192.168.1.10"
#define INSTRUCTOR_REGISTRY_PORT 9000
#define MY_SERVER_IP_STRING "192.168.1.105"
#define STUDENT_SERVER_PORT 15000

// Parse a port from argv; exit with a usage message when it is not 1-65535.
static int parse_port(const char *text) {
    char *end = nullptr;
    errno = 0;
    long value = std::strtol(text, &end, 10);
    if (errno != 0 || end == text || *end != '\0' || value < 1 || value > 65535) {
        std::cerr << "usage: student_client [REGISTRY_IP REGISTRY_PORT [MY_SERVER_IP "
                     "[MY_SERVER_PORT]]]  (ports: 1-65535, got '"
                  << text << "')" << std::endl;
        std::exit(64);
    }
    return static_cast<int>(value);
}

int main(int argc, char *argv[]) {
    if (argc == 2 || argc > 5) {
        std::cerr << "usage: student_client [REGISTRY_IP REGISTRY_PORT [MY_SERVER_IP "
                     "[MY_SERVER_PORT]]]"
                  << std::endl;
        return 64;
    }
    std::string registry_ip = argc > 2 ? argv[1] : INSTRUCTOR_REGISTRY_IP;
    int registry_port = argc > 2 ? parse_port(argv[2]) : INSTRUCTOR_REGISTRY_PORT;
    std::string my_server_ip = argc > 3 ? argv[3] : MY_SERVER_IP_STRING;
    int my_server_port = argc > 4 ? parse_port(argv[4]) : STUDENT_SERVER_PORT;

    // a. Create socket.
    int client_sock = socket(AF_INET, SOCK_STREAM, 0);
    if (client_sock < 0) {
        perror("socket");
        return 1;
    }

    // b. The registry's address.
    struct sockaddr_in registry_server_addr;
    std::memset(&registry_server_addr, 0, sizeof(registry_server_addr));
    registry_server_addr.sin_family = AF_INET;
    registry_server_addr.sin_port = htons(registry_port);
    if (inet_pton(AF_INET, registry_ip.c_str(), &registry_server_addr.sin_addr) != 1) {
        std::cerr << "inet_pton: invalid registry address '" << registry_ip << "'" << std::endl;
        close(client_sock);
        return 1;
    }

    // c. Connect.
    if (connect(client_sock, (struct sockaddr *)&registry_server_addr,
                sizeof(registry_server_addr)) < 0) {
        perror("connect");
        close(client_sock);
        return 1;
    }

    // d. The message: "IP:PORT", no newline.
    std::string message_to_send = my_server_ip + ":" + std::to_string(my_server_port);

    // e. Send it and print a confirmation.
    if (send(client_sock, message_to_send.c_str(), message_to_send.length(), 0) < 0) {
        perror("send");
        close(client_sock);
        return 1;
    }
    std::cout << "Sent to Registry Server: " << message_to_send << std::endl;

    // g. Close at once (no recv): the close is what tells the registry the request ended.
    close(client_sock);
    return 0;
}
