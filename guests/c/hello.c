/* hello: the C version of hello.S. Prints a greeting, powers off with status 0. */
#include <stdio.h>

int main(void)
{
    printf("Hello from an lguest guest!\n");
    return 0;
}
