/* The dist test's listener: listen(port, backlog) on every address and never accept, so that
 * its accept queue overflows. Built statically by `cargo xtask dist-test`, run in the systemd
 * guest and, as its own image, in a container beside qtrace's. */
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <unistd.h>

int main(int argc, char **argv) {
    int port = argc > 1 ? atoi(argv[1]) : 8080, backlog = argc > 2 ? atoi(argv[2]) : 1;
    int one = 1, fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(port)};
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(fd, (struct sockaddr *)&addr, sizeof addr) || listen(fd, backlog)) {
        perror("listener");
        return 1;
    }
    printf("listening on port %d, backlog %d, never accepting\n", port, backlog);
    fflush(stdout);
    for (;;)
        pause();
}
