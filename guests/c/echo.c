/* echo: the C version of echo.S, over stdio.  Echoes each line of input;
 * after a line "quit" prints "bye" and powers off with status 0, as it does
 * at the end of input. */
#include <stdio.h>
#include <string.h>

int main(void)
{
    char line[256];
    while (fgets(line, sizeof line, stdin)) {
        fputs(line, stdout);
        fflush(stdout);
        if (strcmp(line, "quit\n") == 0) {
            puts("bye");
            return 0;
        }
    }
    return 0;
}
