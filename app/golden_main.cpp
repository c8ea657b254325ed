#include <cstdio>
int main(int argc, char** argv) { std::puts("golden: not built yet"); return 1; }
