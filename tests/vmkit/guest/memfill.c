/* Put known content into anonymous user memory and keep it resident until killed.
 *
 * usage: memfill pattern|zero MIB READY_FILE
 *   pattern: every 4 KiB page = "KDCPANON" + u64 little-endian page index + 4080 x 0xA5
 *   zero:    every page written with zeros (allocated, not the shared zero page)
 * READY_FILE is created once the memory is filled; then the process sleeps forever.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define PAGE 4096UL

int main(int argc, char **argv)
{
	if (argc != 4 || (strcmp(argv[1], "pattern") && strcmp(argv[1], "zero"))) {
		fprintf(stderr, "usage: %s pattern|zero MIB READY_FILE\n", argv[0]);
		return 2;
	}
	int zero = !strcmp(argv[1], "zero");
	size_t len = strtoul(argv[2], NULL, 10) << 20;
	unsigned char *mem = mmap(NULL, len, PROT_READ | PROT_WRITE,
				  MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (mem == MAP_FAILED) {
		perror("memfill: mmap");
		return 1;
	}
	for (size_t off = 0; off < len; off += PAGE) {
		unsigned char *page = mem + off;
		if (zero) {
			memset(page, 0, PAGE);
			continue;
		}
		uint64_t index = off / PAGE;
		memcpy(page, "KDCPANON", 8);
		memcpy(page + 8, &index, 8); /* x86_64: little-endian */
		memset(page + 16, 0xA5, PAGE - 16);
	}
	FILE *ready = fopen(argv[3], "w");
	if (!ready) {
		perror("memfill: ready file");
		return 1;
	}
	fprintf(ready, "%zu\n", len);
	fclose(ready);
	for (;;)
		pause();
}
